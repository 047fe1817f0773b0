"""Data-parallel training on the CPU: `--procs 2` (two processes, shared-memory collective) ends
bit-identical to one process with `--grad-shards 2`; a 2-process run resumes in 1 process; the
replica checksum names a perturbed tensor; the loader's parts make up its batches.
Run: python -m pytest tests/test_distributed.py
"""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ternet.config import Config
from ternet.run import RunDir
from ternet.train import Trainer, latest_checkpoint

SMALL = "8C5p0-MP2-16C5p0-MP2-32FC"
# 400 images / 50 = 8 steps per epoch: metrics every 3 steps, checkpoints at 5, 8, 10, 15, 16
# and replica checks every 4 steps
OPTS = dict(arch=SMALL, epochs=2, batch_size=50, log_every=3, ckpt_every=5, keep_last=10, check_every=4,
            grad_shards=2)


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "ternet", "train", *args], capture_output=True, text=True, env=env)


def _procs_run(tiny_data, path, source, procs=2, **kw):
    args = ["--data", str(tiny_data), "--sampler", "dst", "--source", source, "--runs-dir", str(path.parent),
            "--name", path.name,
            "--quiet", "--procs", str(procs)]
    for k, v in dict(OPTS, **kw).items():
        if k != "grad_shards" or "grad_shards" in kw:     # by default: the process count
            args += [f"--{k.replace('_', '-')}", str(v)]
    res = _cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    return RunDir(path)


def _one_process(tiny_data, path, source, **kw):
    cfg = Config(data=str(tiny_data), sampler="dst", source=source, **dict(OPTS, **kw)).resolve()
    run = RunDir(path)
    run.create(cfg)
    Trainer(cfg, run, progress=False).fit()
    return run


def _state(path):
    """Every dataset of a checkpoint (weights, real parameters, running statistics, optimizer and
    sampler slots) and its trainer state."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        out["trainer"] = json.loads(f.attrs["trainer"])
    return out


def assert_same_run(a, b):
    ca, cb = a.checkpoints(), b.checkpoints()
    assert [p.name for p in ca] == [p.name for p in cb]
    sa, sb = _state(ca[-1]), _state(cb[-1])
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if k == "trainer":
            assert sa[k] == sb[k]
        else:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert a.metrics_path.read_bytes() == b.metrics_path.read_bytes()


@pytest.fixture(scope="module")
def two_procs(tiny_data, tmp_path_factory):
    return _procs_run(tiny_data, tmp_path_factory.mktemp("dp") / "procs2", "sgd")


def test_two_processes_equal_one_with_two_shards(tiny_data, tmp_path, two_procs):
    assert json.loads(two_procs.config_path.read_text())["grad_shards"] == 2
    one = _one_process(tiny_data, tmp_path / "one", "sgd")
    assert_same_run(two_procs, one)
    names = set(_state(one.checkpoints()[-1]))
    assert any(n.startswith("buffers/") and n.endswith("running_var") for n in names)


def test_two_processes_equal_one_adam_source(tiny_data, tmp_path):
    procs = _procs_run(tiny_data, tmp_path / "procs2", "adam")
    one = _one_process(tiny_data, tmp_path / "one", "adam")
    assert_same_run(procs, one)
    assert any(n.endswith("/adam_m") for n in _state(one.checkpoints()[-1]))   # the moments were compared


def test_two_shards_per_process_add_in_shard_order(tiny_data, tmp_path):
    # 2 processes x 2 shards: each process's shards are reduced apart, so the sum runs over shards
    # 0, 1, 2, 3 in turn, as in one process (a per-process partial sum would group them differently)
    kw = dict(grad_shards=4, batch_size=40, epochs=1, ckpt_every=4)
    assert_same_run(_procs_run(tiny_data, tmp_path / "procs2", "sgd", **kw),
                    _one_process(tiny_data, tmp_path / "one", "sgd", **kw))


def test_resume_two_process_run_in_one_process(two_procs, tmp_path):
    run = RunDir(tmp_path / "resumed")
    shutil.copytree(two_procs.path, run.path)
    for p in run.checkpoints():          # as if the run had died after step 10 (mid-epoch)
        if int(p.stem.split("-")[1]) > 10:
            p.unlink()
    ck = latest_checkpoint(run)
    assert ck["trainer"]["step"] == 10 and ck["trainer"]["batch"] == 2
    t = Trainer(run.config(), run, progress=False)
    t.restore(ck)
    t.fit()
    assert_same_run(two_procs, run)


def _perturbed_replica(coll, out_dir):
    """Rank 1 changes one weight state, then one running variance; records each check's error."""
    from ternet.distributed import ReplicaDivergence
    from ternet.model import Model
    model = Model(SMALL, (28, 28, 1), 10)
    coll.checksum_check(model, 0)                 # identical replicas pass
    layers = {layer.name: layer for layer in model.layers()}
    for step, name in enumerate(["conv2", "bn1"], start=1):
        if coll.rank == 1 and name == "conv2":
            q = layers["conv2"].w.q.reshape(-1)
            q[7] = 1 - abs(q[7])                  # another state
        elif coll.rank == 1:
            layers["bn1"].running_var[3] += 1
        try:
            coll.checksum_check(model, step * 100)
            msg = "no error"
        except ReplicaDivergence as e:
            msg = str(e)
        (out_dir / f"{name}-rank{coll.rank}.txt").write_text(msg)
    return 0


def test_checksum_names_the_diverged_tensor(tmp_path):
    from ternet.distributed import spawn
    assert spawn(2, "shm", _perturbed_replica, (tmp_path,)) == 0
    for rank in (0, 1):                           # every rank raises, with the same message
        msg = (tmp_path / f"conv2-rank{rank}.txt").read_text()
        assert "diverged by step 100" in msg and "rank 1" in msg and "'conv2.weight'" in msg, msg
        msg = (tmp_path / f"bn1-rank{rank}.txt").read_text()
        assert "step 200" in msg and "2 tensors differ" in msg and "'conv2.weight'" in msg, msg
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("ternet-")]   # segments removed


def _sum_in_order(coll, out_dir):
    """allreduce_sum and reduce_shards on float32, float64 and int64 arrays."""
    a = np.array([1.0, 1e8, -1e8], np.float32) * (coll.rank + 1)
    b = np.full((2, 3), 0.1 * (coll.rank + 1))
    c = np.arange(4, dtype=np.int64) + coll.rank
    coll.allreduce_sum([a, b, c])
    parts = [[np.float32([0.1, 2.0]) * (2 * coll.rank + j + 1)] for j in range(2)]
    coll.reduce_shards(parts)
    ref = [np.full(1, 7.0) if coll.rank == 0 else np.zeros(1)]
    coll.broadcast(ref, root=0)
    np.savez(out_dir / f"rank{coll.rank}.npz", a=a, b=b, c=c, s=parts[0][0], ref=ref[0])
    return 0


def test_shm_sums_in_rank_and_shard_order(tmp_path):
    from ternet.distributed import spawn
    assert spawn(2, "shm", _sum_in_order, (tmp_path,)) == 0
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k])
    a = np.array([1.0, 1e8, -1e8], np.float32)
    np.testing.assert_array_equal(r0["a"], a + a * np.float32(2))
    np.testing.assert_array_equal(r0["b"], np.full((2, 3), 0.1) + np.full((2, 3), 0.1 * 2))
    np.testing.assert_array_equal(r0["c"], 2 * np.arange(4) + 1)
    x = np.float32([0.1, 2.0])
    np.testing.assert_array_equal(r0["s"], ((x * 1 + x * 2) + x * 3) + x * 4)   # shards 0, 1, 2, 3 in turn
    assert r1["ref"][0] == 7.0                    # broadcast: rank 0's values


def test_failing_rank_stops_the_others(tmp_path):
    from ternet.distributed import spawn
    assert spawn(2, "shm", _fail_on_rank1, (tmp_path,)) == 3
    assert "another rank stopped" in (tmp_path / "rank0.txt").read_text()


def _fail_on_rank1(coll, out_dir):
    if coll.rank == 1:
        return 3
    try:
        coll.barrier()
    except RuntimeError as e:
        (out_dir / "rank0.txt").write_text(str(e))
    return 1


@pytest.mark.parametrize("augment", ["crop-flip", "rrc-flip"])
def test_loader_parts_make_up_the_batch(tiny_data, augment):
    from ternet.loader import Loader
    kw = dict(shuffle=True, augment=augment, seed=5, output_size=24 if augment == "rrc-flip" else None)
    whole = next(Loader(tiny_data, "train", 12, **kw).batches(1, start=3))
    parts = [next(Loader(tiny_data, "train", 12, **kw).batches(1, start=3, part=(i, 3))) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), whole[0])
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), whole[1])


def test_process_count_must_divide_grad_shards(tiny_data, tmp_path):
    from click.testing import CliRunner

    from ternet.cli import cli
    args = ["train", "--data", str(tiny_data), "--arch", SMALL, "--runs-dir", str(tmp_path), "--quiet"]
    r = CliRunner().invoke(cli, args + ["--procs", "2", "--grad-shards", "3", "--batch-size", "48"])
    assert r.exit_code == 2 and "cannot share --grad-shards 3" in r.output
    r = CliRunner().invoke(cli, args + ["--grad-shards", "3", "--batch-size", "50"])
    assert r.exit_code == 2 and "must split into --grad-shards 3" in r.output
    r = CliRunner().invoke(cli, args + ["--procs", "2", "--device", "cuda"])
    assert r.exit_code == 2 and "use --gpus K" in r.output
    assert not os.listdir(tmp_path)               # nothing was created
