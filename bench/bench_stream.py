"""Training from a split that is not kept on the GPU: device_data.StreamLoader (pinned buffers, a
copy stream, one batch ahead) against the per-step synchronous copy it replaced (TERNET_STREAM=0)
and against the GPU-resident DeviceLoader, in one process on one synthetic split.

    python bench/bench_stream.py [--arch vgg-gxnor] [--side 32] [--batch 512] [--images 25600] [--epochs 2]

The streamed and copied runs use the host Loader (its threads augment into the batches); the
resident run augments on the GPU. Reports the median img/s of the logged intervals after the
first epoch and whether the streamed run's weights equal the copied run's (they must: the same
host batches). One JSON line per mode.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_graph import interval_rate, synthetic  # noqa: E402


def run(data, tmp, args, mode):
    from ternet import device_data
    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    real = device_data.fits_on_device
    device_data.fits_on_device = (lambda loader, fraction=0.25: False) if mode != "resident" else real
    os.environ["TERNET_STREAM"] = "0" if mode == "copy" else "1"
    try:
        cfg = Config(data=str(data), arch=args.arch, sampler="bop", epochs=args.epochs, batch_size=args.batch,
                     augment="crop-flip", device="cuda", log_every=10, ckpt_every=0).resolve()
        run = RunDir(tmp / mode)
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        loader = type(t.train_loader).__name__
        t.fit()
    finally:
        device_data.fits_on_device = real
        os.environ.pop("TERNET_STREAM", None)
    return dict(mode=mode, loader=loader, arch=args.arch, side=args.side, batch=args.batch,
                img_per_s=round(interval_rate(run), 1)), t.model.state_dict()["weights"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vgg-gxnor")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--images", type=int, default=25600)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        data = synthetic(tmp / "data", args.side, args.images)
        weights = {}
        for mode in ("resident", "stream", "copy"):
            rec, weights[mode] = run(data, tmp, args, mode)
            print(json.dumps(rec), flush=True)
        same = all(np.array_equal(weights["stream"][k], weights["copy"][k]) for k in weights["copy"])
        print(json.dumps({"stream_weights_equal_copy": same}), flush=True)


if __name__ == "__main__":
    main()
