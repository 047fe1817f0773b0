"""The training loop end to end on a tiny real dataset: the run directory, checkpoints holding
int8 states only, exact resume after a crash (in process and after SIGKILL), evaluation."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ternet.config import Config
from ternet.run import RunDir
from ternet.train import Trainer, latest_checkpoint

SMALL = "8C5p0-MP2-16C5p0-MP2-32FC"


def make(tiny_data, path, **kw):
    base = dict(data=str(tiny_data), arch=SMALL, epochs=2, batch_size=50, log_every=3, ckpt_every=5, keep_last=2,
                sampler="dst")
    base.update(kw)
    cfg = Config(**base).resolve()
    run = RunDir(path)
    return cfg, run


def fresh_run(cfg, run):
    run.create(cfg)
    t = Trainer(cfg, run, progress=False)
    t.fit()
    return t


def test_run_directory(tiny_data, tmp_path):
    cfg, run = make(tiny_data, tmp_path / "r")
    fresh_run(cfg, run)
    assert json.loads(run.config_path.read_text())["arch"] == SMALL
    recs = run.metrics()
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "init" and kinds.count("epoch") == 2 and "step" in kinds
    ep = [r for r in recs if r["type"] == "epoch"][-1]
    assert 0 <= ep["test_acc"] <= 1 and ep["train_loss"] > 0
    for name, st in ep["layers"].items():
        assert len(st["counts"]) == 3 and 0 <= st["flip_rate"] <= 1
    assert len(run.checkpoints()) == 2                # keep-last-k
    assert all(json.loads(l) for l in run.timing_path.read_text().splitlines())


def test_checkpoint_written_in_the_background_holds_the_state_of_its_save(tiny_data, tmp_path):
    """The trainer snapshots its state and trains on while a thread writes the file: what is in the
    file is the state at save(), not what the weights became during the write."""
    from ternet import checkpoint
    cfg, run = make(tiny_data, tmp_path / "r", epochs=1, sampler="bop")
    t = fresh_run(cfg, run)
    before = {p.name: np.array(p.q) for p in t.model.tparams()}
    slots = {p.name: {k: np.array(v) for k, v in p.slots.items()} for p in t.model.tparams()}
    gate = __import__("threading").Event()
    real_write = checkpoint.write
    checkpoint.write = lambda path, snap: (gate.wait(10), real_write(path, snap))
    t.state["step"] += 1                     # a new file: the epoch's checkpoint is at the last step
    try:
        path = t.save()
        for p in t.model.tparams():         # "training goes on": every state and momentum changes
            p.q[...] = -p.q
            for v in p.slots.values():
                v += 1
        assert not path.exists()             # still held at the gate: not there yet, no half file
        gate.set()
        t.writer.wait()
    finally:
        checkpoint.write = real_write
    ck = checkpoint.load(path)
    assert set(ck["weights"]) == set(before) and all(np.array_equal(ck["weights"][k], before[k]) for k in before)
    assert any(slots[k] for k in slots)
    for name, d in slots.items():
        for k, v in d.items():
            np.testing.assert_array_equal(ck["slots"][name][k], v)
    assert len(run.checkpoints()) == cfg.keep_last    # pruned after the write


def test_checkpoint_writer_reports_a_failed_write(tmp_path):
    from ternet import checkpoint
    w = checkpoint.Writer()
    w.submit(tmp_path / "missing-folder" / "ckpt-000000001.h5", {"attrs": {}, "groups": {}, "slots": {}})
    with pytest.raises(checkpoint.CheckpointError, match="writing a checkpoint failed"):
        w.wait()
    w.wait()                                  # reported once


@pytest.mark.parametrize("source", ["sgd", "adam"])
def test_checkpoint_holds_int8_states_only(tiny_data, tmp_path, source):
    cfg, run = make(tiny_data, tmp_path / "r", epochs=1, source=source)
    t = fresh_run(cfg, run)
    weight_shapes = {p.name: p.q.shape for p in t.model.tparams()}
    with h5py.File(run.checkpoints()[-1], "r") as f:
        for name, shape in weight_shapes.items():
            q = f["weights"][name][()]
            assert q.dtype == np.int8 and q.shape == shape and set(np.unique(q)) <= {-1, 0, 1}
        floats = []
        f.visititems(lambda n, o: floats.append((n, o.shape)) if isinstance(o, h5py.Dataset)
                     and o.dtype.kind == "f" else None)
    shaped_like_weights = [n for n, s in floats if s in weight_shapes.values()]
    if source == "sgd":
        # no float array of a discrete weight's shape anywhere in the checkpoint or the sampler
        assert shaped_like_weights == []
        assert all(p.slots == {} for p in t.model.tparams())
    else:
        # the authors' Adam source keeps two fp32 moments per weight, and says so
        assert sorted(n.split("/")[-1] for n in shaped_like_weights) == sorted(["adam_m", "adam_v"] * len(weight_shapes))
    # the optimizer holds state for batch-norm parameters only
    assert set(k.rsplit("/", 1)[0] for k in t.optimizer.state_dict()) == {p.name for p in t.model.rparams()}


def _weights(path):
    with h5py.File(path, "r") as f:
        return {k: f["weights"][k][()] for k in f["weights"]}


def test_exact_resume_in_process(tiny_data, tmp_path):
    cfg, run_a = make(tiny_data, tmp_path / "a")
    fresh_run(cfg, run_a)
    _, run_b = make(tiny_data, tmp_path / "b")
    run_b.create(cfg)
    t = Trainer(cfg, run_b, progress=False)
    real_step, calls = t.train_step, [0]

    def crashing(x, y):       # dies in the middle of the second epoch, between checkpoints
        calls[0] += 1
        if calls[0] == 12:
            raise RuntimeError("crash")
        real_step(x, y)

    t.train_step = crashing
    with pytest.raises(RuntimeError):
        t.fit()
    assert t.state["step"] == 11
    t2 = Trainer(cfg, run_b, progress=False)
    ck = latest_checkpoint(run_b)
    assert ck["trainer"]["step"] == 10 and ck["trainer"]["batch"] == 2   # mid-epoch
    t2.restore(ck)
    t2.fit()
    wa, wb = _weights(run_a.checkpoints()[-1]), _weights(run_b.checkpoints()[-1])
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert run_a.metrics_path.read_bytes() == run_b.metrics_path.read_bytes()


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "ternet", *map(str, args)], capture_output=True, text=True,
                          env=env, **kw)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--arch", SMALL, "--epochs", "3", "--batch-size", "20", "--log-every", "4",
            "--ckpt-every", "7", "--runs-dir", str(tmp_path), "--quiet"]
    ref = _cli("train", *args, "--name", "ref")
    assert ref.returncode == 0, ref.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ternet", "train", *args, "--name", "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    run = RunDir(tmp_path / "killed")
    deadline = time.time() + 120
    while time.time() < deadline:   # wait for the second mid-epoch checkpoint, then kill hard
        if any(int(p.stem.split("-")[1]) >= 14 for p in run.checkpoints()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = latest_checkpoint(run)
    steps, before, n0 = ck["trainer"]["step"], ck["seconds"], len(run.timing_path.read_text().splitlines())
    assert 14 <= steps < 60, f"killed too late (checkpoint at step {steps})"
    res = _cli("train", "--resume", str(run.path), "--quiet")
    assert res.returncode == 0, res.stderr
    wa, wb = _weights(RunDir(tmp_path / "ref").checkpoints()[-1]), _weights(run.checkpoints()[-1])
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert (tmp_path / "ref" / "metrics.jsonl").read_bytes() == run.metrics_path.read_bytes()
    # the wall clock goes on from the checkpoint: the resumed process's timing lines start at its
    # seconds, and the last checkpoint counts the time before the resume too
    resumed = [json.loads(line)["seconds"] for line in run.timing_path.read_text().splitlines()[n0:]]
    assert before > 0 and resumed and min(resumed) >= before
    assert latest_checkpoint(run)["seconds"] >= max(resumed) - 1e-6


def test_eval_and_inspect(tiny_data, tmp_path):
    cfg, run = make(tiny_data, tmp_path / "r", epochs=1)
    t = fresh_run(cfg, run)
    res = _cli("eval", str(run.path))
    assert res.returncode == 0, res.stderr
    acc = float(res.stdout.split("accuracy")[1])
    assert abs(acc - run.metrics()[-1]["test_acc"]) < 1e-9
    out = _cli("inspect", str(run.path), "--json")
    info = json.loads(out.stdout)
    assert set(info["layers"]) == {p.name for p in t.model.tparams()}
    first = next(iter(info["layers"].values()))
    assert [r["epoch"] for r in first] == ["init", 1] and abs(sum(first[1]["fractions"]) - 1) < 1e-9
    png = tmp_path / "states.png"
    txt = _cli("inspect", str(run.path), "--png", str(png))
    assert txt.returncode == 0 and "flip rate" in txt.stdout and png.stat().st_size > 1000


class _Fixed:
    """A loader stand-in that yields the given images and labels in batches of 16."""
    def __init__(self, x, y):
        self.x, self.y = x, y

    def batches(self, epoch):
        for i in range(0, len(self.y), 16):
            yield self.x[i:i + 16], self.y[i:i + 16]


def test_eval_flip_averages_each_image_with_its_mirror(tiny_data, tmp_path):
    from ternet.evaluate import evaluate, load_model
    from ternet.loader import Loader
    from ternet.train import open_data
    cfg, run = make(tiny_data, tmp_path / "r", epochs=1)
    fresh_run(cfg, run)
    _, model = load_model(run.path, "cpu")
    x, y = next(Loader(open_data(cfg), "test", 48, shuffle=False, augment="none", seed=0).batches(0))
    mirror = np.ascontiguousarray(x[:, :, ::-1])
    la = np.array(model.forward(x, train=False))
    lb = np.array(model.forward(mirror, train=False))
    assert not np.array_equal(la, lb)          # the mirror images do change the logits
    z = (la + lb) * np.float32(0.5)
    z64 = z.astype(np.float64) - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z64).sum(1)) - z64[np.arange(len(y)), y])
    got = evaluate(model, _Fixed(x, y), "xent", tta="flip")
    assert got[1] == np.mean(z.argmax(1) == y)
    assert abs(got[0] - loss) < 1e-5
    # images that are their own mirror: flip averaging changes nothing, bit for bit
    sym = ((x + mirror) * np.float32(0.5)).astype(np.float32)
    assert evaluate(model, _Fixed(sym, y), "xent", tta="flip") == evaluate(model, _Fixed(sym, y), "xent")
    with pytest.raises(ValueError, match="--tta"):
        evaluate(model, _Fixed(x, y), "xent", tta="crop")
    res = _cli("eval", str(run.path), "--tta", "flip", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "test: loss" in res.stdout
    bad = _cli("eval", str(run.path), "--tta", "flip", "--integer")
    assert bad.returncode != 0 and "--tta works on the float path only" in bad.stderr


def test_eval_tta_flip_is_logged_each_epoch(tiny_data, tmp_path):
    from ternet.evaluate import evaluate_run
    cfg, run = make(tiny_data, tmp_path / "r", epochs=1, eval_tta="flip")
    fresh_run(cfg, run)
    ep = [r for r in run.metrics() if r["type"] == "epoch"][-1]
    assert evaluate_run(run.path, device="cpu", tta="flip")["test"] == (ep["test_loss_flip"], ep["test_acc_flip"])
    assert evaluate_run(run.path, device="cpu")["test"] == (ep["test_loss"], ep["test_acc"])
    shown = _cli("inspect", str(run.path)).stdout
    assert f"test accuracy, flip evaluation, by epoch: 1:{ep['test_acc_flip']:.4f}" in shown
    bad = _cli("train", "--eval-tta", "crop", "--epochs", "1")
    assert bad.returncode != 0 and "--eval-tta" in bad.stderr


def test_inspect_outlines_a_long_run_and_draws_it(tiny_data, tmp_path):
    """A run of 500 epochs (its epoch records repeated): the terminal view prints --rows evenly
    spaced epochs, first and last included, --rows 0 all of them, and the PNG is drawn although
    its bars are narrower than a pixel."""
    from ternet.inspect import collect, inspect_run, render_text, shown
    cfg, run = make(tiny_data, tmp_path / "r", epochs=1)
    fresh_run(cfg, run)
    recs = run.metrics()
    ep = next(r for r in recs if r["type"] == "epoch")
    with open(run.metrics_path, "w") as f:
        for r in [x for x in recs if x["type"] != "epoch"] + [dict(ep, epoch=e) for e in range(500)]:
            f.write(json.dumps(r) + "\n")
    assert shown(10, 25) == list(range(10)) and shown(501, 0) == list(range(501))
    assert shown(501, 5) == [0, 125, 250, 375, 500]
    text = render_text(collect(run.path), rows=5)
    layer_lines = [ln.split()[0] for ln in text.splitlines() if ln.startswith("     ")]
    n_layers = len(collect(run.path)["layers"])
    assert layer_lines == ["init", "125", "250", "375", "500"] * n_layers
    assert "(5 of 501 epoch rows shown" in text and "test accuracy by epoch: 125:" in text
    full = render_text(collect(run.path), rows=0)
    assert sum(ln.startswith("     ") for ln in full.splitlines()) == 501 * n_layers
    png = tmp_path / "long.png"
    inspect_run(run.path, png=str(png), echo=lambda *_: None)
    assert png.stat().st_size > 1000


def test_init_starts_from_another_runs_weights(tiny_data, tmp_path):
    """--init: a second stage (here at another batch size and lr) starts from the first run's
    newest checkpoint: the same states, batch-norm parameters and statistics, fresh step count."""
    cfg, run_a = make(tiny_data, tmp_path / "a", epochs=1)
    first = fresh_run(cfg, run_a)
    source = latest_checkpoint(run_a)
    r = _cli("train", "--data", str(tiny_data), "--arch", SMALL, "--sampler", "dst", "--device", "cpu", "--quiet",
             "--epochs", 1, "--batch-size", 100, "--lr", 0.001, "--init", run_a.path,
             "--runs-dir", tmp_path, "--name", "b")
    assert r.returncode == 0, r.stderr
    run_b = RunDir(tmp_path / "b")
    init = run_b.metrics()[0]
    assert init["type"] == "init"
    assert {k: v["counts"] for k, v in init["layers"].items()} == \
        {p.name: [int(c) for c in np.bincount(p.q.ravel() + 1, minlength=3)] for p in first.model.tparams()}
    second = Trainer(Config.from_dict(json.loads(run_b.config_path.read_text())), RunDir(tmp_path / "c"),
                     progress=False)
    second.initialize(str(run_a.checkpoints()[-1]))          # a checkpoint file works too
    mine = second.model.state_dict()
    for group in ("weights", "real", "buffers"):
        for k, a in mine[group].items():
            np.testing.assert_array_equal(a, source[group][k])
    assert second.state["step"] == 0
    assert latest_checkpoint(run_b)["trainer"]["step"] == second.spe     # one epoch at batch 100, from 0


def test_init_errors_name_the_checkpoint_and_leave_no_run(tiny_data, tmp_path):
    cfg, run_a = make(tiny_data, tmp_path / "a", epochs=1)
    fresh_run(cfg, run_a)
    base = ("train", "--data", str(tiny_data), "--sampler", "dst", "--device", "cpu", "--quiet", "--epochs", 1,
            "--runs-dir", tmp_path / "runs", "--name", "b")
    r = _cli(*base, "--arch", "8C5p0-MP2-16C5p0-MP2-64FC", "--init", run_a.path)
    assert r.returncode == 2 and "--init" in r.stderr and "use the same architecture" in r.stderr
    r = _cli(*base, "--arch", SMALL, "--bits", 2, "--init", run_a.path)
    assert r.returncode == 2 and "--bits 1" in r.stderr and "use the same --bits" in r.stderr
    r = _cli(*base, "--arch", SMALL, "--init", tmp_path / "nowhere")
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli(*base, "--arch", SMALL, "--init", tmp_path / "empty")
    assert r.returncode == 2 and "without a readable checkpoint" in r.stderr
    assert not (tmp_path / "runs" / "b").exists()
