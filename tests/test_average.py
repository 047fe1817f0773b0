"""`ternet average`: the nearest state to each weight's mean over checkpoints, the batch-norm
parameters' mean, statistics recomputed; the written file evaluates as reported."""
import dataclasses
import itertools
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from ternet import checkpoint
from ternet.average import average_run, average_state, nearest_mean_state, recalibrate
from ternet.config import Config, validate
from ternet.evaluate import evaluate, load_model
from ternet.inspect import collect
from ternet.layers import BatchNorm, walk
from ternet.loader import Loader
from ternet.run import RunDir
from ternet.train import Trainer, latest_checkpoint, open_data

SMALL = "8C5p0-MP2-16C5p0-MP2-32FC"


@pytest.mark.parametrize("qmax", [1, 2])
def test_nearest_mean_state_against_exact_fractions(qmax):
    """Every sequence of up to four states: the state nearest to the exact mean; a tie keeps the newest."""
    states = range(-qmax, qmax + 1)
    for k in range(1, 5):
        seqs = np.array(list(itertools.product(states, repeat=k)), np.int8)       # (cases, k)
        got = nearest_mean_state(seqs.astype(np.int64).sum(1), k, seqs[:, -1])
        for seq, g in zip(seqs.tolist(), got.tolist()):
            mean = Fraction(sum(seq), k)
            dist = {s: abs(s - mean) for s in states}
            best = [s for s in states if dist[s] == min(dist.values())]
            assert g == (best[0] if len(best) == 1 else seq[-1]), (seq, g)


def test_average_state_means_the_reals_and_keeps_the_newest_buffers():
    cks = [{"weights": {"w": np.array([1, -1, 0, 1], np.int8)}, "real": {"g": np.array([1.0, 2.0], np.float32)},
            "buffers": {"m": np.array([5.0], np.float32)}},
           {"weights": {"w": np.array([1, 1, 1, 0], np.int8)}, "real": {"g": np.array([3.0, 2.5], np.float32)},
            "buffers": {"m": np.array([7.0], np.float32)}}]
    st, newest = average_state(iter(cks))
    assert newest is cks[-1]
    np.testing.assert_array_equal(st["weights"]["w"], [1, 0, 1, 0])     # means 1, 0, 1/2, 1/2: ties keep the newest
    np.testing.assert_array_equal(st["real"]["g"], np.array([2.0, 2.25], np.float32))
    np.testing.assert_array_equal(st["buffers"]["m"], [7.0])


@pytest.fixture(scope="module")
def averaged_run(tiny_data, tmp_path_factory):
    cfg = Config(data=str(tiny_data), arch=SMALL, epochs=3, batch_size=50, ckpt_every=0, keep_last=3,
                 sampler="bop", log_every=5).resolve()
    run = RunDir(tmp_path_factory.mktemp("avg") / "r")
    run.create(cfg)
    Trainer(cfg, run, progress=False).fit()
    return cfg, run


def test_recalibrate_is_the_mean_of_the_batch_statistics(averaged_run):
    cfg, run = averaged_run
    ds = open_data(cfg)
    loader = lambda: Loader(ds, "train", 40, shuffle=True, augment="none", seed=5)
    _, model = load_model(run.path, "cpu")
    bns = [layer for layer in walk(model.net) if isinstance(layer, BatchNorm)]
    momenta = [b.momentum for b in bns]
    batch_means = []
    for x, _ in itertools.islice(loader().batches(0), 3):    # one batch's statistics each
        for b in bns:
            b.momentum = 1.0
        model.forward(x, train=True)
        batch_means.append([np.array(b.running_mean) for b in bns])
    for b, m in zip(bns, momenta):
        b.momentum = m
    _, model = load_model(run.path, "cpu")
    assert recalibrate(model, loader(), 120) == 120
    bns = [layer for layer in walk(model.net) if isinstance(layer, BatchNorm)]
    for i, b in enumerate(bns):
        np.testing.assert_allclose(b.running_mean, np.mean([bm[i] for bm in batch_means], axis=0), rtol=1e-5,
                                   atol=1e-6)
    assert [b.momentum for b in bns] == momenta


def test_average_run_writes_what_it_reports(averaged_run, tmp_path):
    cfg, run = averaged_run
    paths = run.checkpoints()
    assert len(paths) == 3
    r = average_run(run.path, 3, images=200, device="cpu", out=str(tmp_path / "avg.h5"))
    assert r["images"] == 200 and set(r["average"]) == set(r["newest"]) == {"test"}
    written = checkpoint.load(r["path"])
    cks = [checkpoint.load(p) for p in paths]
    for name, q in written["weights"].items():
        qs = np.stack([c["weights"][name] for c in cks])
        np.testing.assert_array_equal(q, nearest_mean_state(qs.astype(np.int64).sum(0), 3, qs[-1]))
    assert r["changed"] == np.mean(np.concatenate(
        [(written["weights"][n] != cks[-1]["weights"][n]).ravel() for n in written["weights"]]))
    _, model = load_model(run.path, "cpu", ckpt=r["path"])
    test = Loader(open_data(cfg), "test", cfg.eval_batch_size, shuffle=False, augment="none", seed=cfg.seed)
    assert evaluate(model, test, cfg.loss) == r["average"]["test"]
    assert latest_checkpoint(run)["trainer"] == cks[-1]["trainer"]      # --resume still takes the run's own
    with pytest.raises(ValueError, match="--keep-last 4"):
        average_run(run.path, 4, device="cpu")


def test_average_and_eval_ckpt_on_the_command_line(averaged_run):
    _, run = averaged_run
    cli = lambda *a: subprocess.run([sys.executable, "-m", "ternet", *map(str, a)], capture_output=True, text=True)
    res = cli("average", run.path, "--last", "2", "--images", "100", "--device", "cpu", "--tta", "flip")
    assert res.returncode == 0, res.stderr
    path = run.path / "average-last2.h5"
    assert f"wrote {path}" in res.stdout
    acc = res.stdout.split("test: ")[1].split("average of 2: loss ")[1].split("accuracy ")[1].split(";")[0]
    flip = res.stdout.split("with flips loss ")[1].split("accuracy ")[1].split()[0]
    ev = cli("eval", run.path, "--ckpt", path, "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy {acc}" in ev.stdout
    ev = cli("eval", run.path, "--ckpt", path, "--device", "cpu", "--tta", "flip")
    assert f"accuracy {flip}" in ev.stdout, (ev.stdout, flip)
    bad = cli("average", run.path, "--last", "9")
    assert bad.returncode != 0 and "--keep-last 9" in bad.stderr
    assert "--ckpt works on the float path only" in cli("eval", run.path, "--ckpt", path, "--integer").stderr


def test_train_average_last_logs_what_average_run_reports(tiny_data, tmp_path):
    """--average-last K: after the last epoch the trainer averages its newest K checkpoints and logs
    the result once (a resumed, finished run re-averages instead of logging twice)."""
    cfg = Config(data=str(tiny_data), arch=SMALL, epochs=3, batch_size=50, ckpt_every=0, keep_last=3,
                 average_last=2, eval_tta="flip", sampler="bop", log_every=5, device="cpu").resolve()
    validate(cfg)
    run = RunDir(tmp_path / "r")
    run.create(cfg)
    trainer = Trainer(cfg, run, progress=False)
    trainer.fit()
    rec = trainer.average()
    assert run.metrics()[-1] == rec and rec["path"] == "average-last2.h5"
    ref = average_run(run.path, 2, device="cpu", out=str(tmp_path / "ref.h5"), tta="flip")
    assert (rec["test_loss"], rec["test_acc"]) == ref["average"]["test"]
    assert (rec["test_loss_flip"], rec["test_acc_flip"]) == ref["average_flip"]["test"]
    assert collect(run.path)["average"] == {k: v for k, v in rec.items() if k != "type"}
    again = Trainer(cfg, run, progress=False)
    again.restore(latest_checkpoint(run))
    assert again.fit() is None
    assert again.average() == rec
    assert [r for r in run.metrics() if r["type"] == "average"] == [rec]
    with pytest.raises(ValueError, match="--keep-last 4"):
        validate(dataclasses.replace(cfg, average_last=4))
    with pytest.raises(ValueError, match="one an epoch, 2 in all"):
        validate(dataclasses.replace(cfg, average_last=3, keep_last=5, epochs=2))
