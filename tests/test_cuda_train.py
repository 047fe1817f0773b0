"""The trainer on the device path (the simulator on machines without a GPU): a tiny run writes
its metrics and checkpoints, moves weights, and repeats bit for bit."""
import numpy as np
import pytest

from cudacheck import needs_cuda
from ternet.config import Config
from ternet.run import RunDir
from ternet.train import Trainer

pytestmark = needs_cuda


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    from data_prep.pack import pack_arrays
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int32)      # a learnable rule
    out = tmp_path_factory.mktemp("micro") / "micro"
    pack_arrays(out, {"train": (images[:32], labels[:32]), "test": (images[32:], labels[32:])}, ["dark", "light"])
    return out


def test_device_training_runs_and_repeats(micro_data, tmp_path):
    states = []
    for i in range(2):
        cfg = Config(data=str(micro_data), arch="4C3-MP2-8FC", sampler="dst", epochs=2, batch_size=16, log_every=1,
                     device="cuda", eval_batch_size=8).resolve()
        run = RunDir(tmp_path / f"r{i}")
        run.create(cfg)
        t = Trainer(cfg, run, progress=False)
        assert t.device
        before = {p.name: p.q.copy_to_host() for p in t.model.tparams()}
        t.fit()
        after = t.model.state_dict()["weights"]
        assert any((before[k] != after[k]).any() for k in after)
        recs = run.metrics()
        assert [r["type"] for r in recs].count("epoch") == 2 and len(run.checkpoints()) >= 1
        states.append((after, run.metrics_path.read_bytes()))
    for k in states[0][0]:
        np.testing.assert_array_equal(states[0][0][k], states[1][0][k])
    assert states[0][1] == states[1][1]


def test_device_training_over_shards(micro_data, tmp_path):
    """grad_shards=2 on the device path: kept shard copies, device sums and division, running
    statistics moved by their own kernel (one run: the simulator takes minutes per run)."""
    cfg = Config(data=str(micro_data), arch="4C3-MP2-8FC", epochs=1, batch_size=16, log_every=1,
                 device="cuda", eval_batch_size=8, grad_shards=2).resolve()
    run = RunDir(tmp_path / "r")
    run.create(cfg)
    t = Trainer(cfg, run, progress=False)
    assert t.sharded is not None and t.sharded.local == 2
    before = t.model.state_dict()
    t.fit()
    after = t.model.state_dict()
    assert 0 in t.sharded.kept and any((before["weights"][k] != after["weights"][k]).any() for k in after["weights"])
    for k, v in after["buffers"].items():      # moved once per step from the shards' mean statistics
        assert np.isfinite(v).all() and (v != before["buffers"][k]).any(), k
    assert [r["type"] for r in run.metrics()] == ["init", "step", "step", "epoch"]
