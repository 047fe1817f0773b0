"""Test accuracy of a run's newest checkpoint with its batch-norm running statistics as trained
(an exponential average over the last ~10 augmented batches), and recomputed: the plain average
over N training images with the final weights, un-augmented and with the run's augmentation.
Training never reads the running statistics (a train step normalises with its batch's), so this
asks only whether the evaluation's statistics cost accuracy (e.g. cutout's zeroed squares shifting
them away from the test images').
    python bench/bn_recal.py RUN [--images 10000] [--device auto|cpu|cuda]"""
import argparse
import json

from ternet.average import recalibrate
from ternet.evaluate import eval_loader, evaluate, load_model
from ternet.loader import Loader
from ternet.train import open_data, train_augment


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=0, help="0: the run's training batch size")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    out = {"run": a.run}
    cfg, model = load_model(a.run, a.device)
    ds = open_data(cfg)
    test = eval_loader(ds, "test", cfg)
    out["as_trained"] = evaluate(model, test, cfg.loss)[1]
    batch = a.batch or cfg.batch_size
    for name, aug, cut in (("clean", "none", 0), ("augmented", train_augment(cfg, ds), cfg.cutout)):
        _, model = load_model(a.run, a.device)       # the checkpoint's statistics again
        train = Loader(ds, "train", batch, shuffle=True, augment=aug, crop_pad=cfg.crop_pad, cutout=cut,
                       seed=cfg.seed + 1)
        n = recalibrate(model, train, a.images)
        out[f"recalibrated_{name}"] = evaluate(model, test, cfg.loss)[1]
    out["images"] = n
    print(json.dumps(out))


if __name__ == "__main__":
    main()
