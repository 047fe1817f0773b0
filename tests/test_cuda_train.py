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
