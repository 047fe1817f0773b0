"""The trainer on the device path (the simulator on machines without a GPU): a tiny run writes
its metrics and checkpoints, moves weights, and repeats bit for bit; sharded steps with the
kept per-layer arrays and the flat optimizer equal fresh arrays and per-tensor updates."""
import numpy as np
import pytest
from numba import cuda

from cudacheck import needs_cuda
from ternet.config import Config
from ternet.data_parallel import ShardedStep
from ternet.distributed import LocalCollective
from ternet.kernels import StepBuffers, fresh, zeros
from ternet.kernels.elementwise import adam_update
from ternet.model import Model
from ternet.optim import RealOptimizer
from ternet.run import RunDir
from ternet.train import Trainer

pytestmark = needs_cuda


def _micro(tmp_path_factory, train):
    from data_prep.pack import pack_arrays
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int32)      # a learnable rule
    out = tmp_path_factory.mktemp("micro") / "micro"
    pack_arrays(out, {"train": (images[:train], labels[:train]), "test": (images[32:], labels[32:])}, ["dark", "light"])
    return out


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    return _micro(tmp_path_factory, 32)


@pytest.fixture(scope="module")
def nano_data(tmp_path_factory):
    # one batch of 16 an epoch: under the simulator a step of this network takes tens of seconds
    return _micro(tmp_path_factory, 16)


def test_device_training_runs_and_repeats(nano_data, tmp_path):
    states = []
    for i in range(2):
        cfg = Config(data=str(nano_data), arch="4C3-MP2-8FC", sampler="dst", epochs=2, batch_size=16, log_every=1,
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


def test_device_epochs_report_flip_evaluation(nano_data, tmp_path):
    """--eval-tta flip on the device path: the record's flip figures are those of evaluate(..., "flip")
    over the device loader (batches mirrored by the device kernel), beside the plain figures."""
    from ternet.evaluate import evaluate
    cfg = Config(data=str(nano_data), arch="4C3-MP2-8FC", sampler="dst", epochs=1, batch_size=16, log_every=1,
                 device="cuda", eval_batch_size=8, eval_tta="flip").resolve()
    run = RunDir(tmp_path / "r")
    run.create(cfg)
    t = Trainer(cfg, run, progress=False)
    t.fit()
    ep = [r for r in run.metrics() if r["type"] == "epoch"][-1]
    loader = t.eval_loaders["test"]
    assert (ep["test_loss_flip"], ep["test_acc_flip"]) == evaluate(t.model, loader, cfg.loss, "flip")
    assert ep["test_loss_flip"] != ep["test_loss"]


def test_cuda_graph_option_names_what_stands_in_the_way(micro_data, tmp_path):
    """--cuda-graph on is refused with a reason where a step cannot be captured: under the
    simulator always; on a GPU with a sampler whose kernels take per-step values as launch
    arguments (metropolis)."""
    from ternet.kernels import SIMULATOR
    cfg = Config(data=str(micro_data), arch="4C3-MP2-8FC", sampler="metropolis", epochs=1, batch_size=16,
                 device="cuda", cuda_graph="on").resolve()
    run = RunDir(tmp_path / "g")
    run.create(cfg)
    why = "needs --device cuda on a GPU" if SIMULATOR else "does not support --sampler metropolis"
    with pytest.raises(ValueError, match=f"--cuda-graph on {why}.*leave --cuda-graph off"):
        Trainer(cfg, run, progress=False)


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


class PerTensorOptimizer(RealOptimizer):
    """RealOptimizer as it was before the flat buffers: one launch per parameter tensor."""

    def __init__(self, kind):
        super().__init__(kind)
        self.slots = {}

    def step(self, reals, lr, t):
        f32 = np.float32
        for p in reals.params:
            if p.name not in self.slots:
                self.slots[p.name] = [cuda.to_device(np.zeros(p.value.shape, np.float32)) for _ in range(2)]
            m, v = self.slots[p.name]
            adam_update(p.value, p.grad, m, v, f32(lr), f32(self.b1), f32(self.b2), f32(1 - self.b1 ** t),
                        f32(1 - self.b2 ** t), f32(self.eps))


def sharded_steps(optimizer=RealOptimizer, steps=2, shards=2):
    """Device state after `steps` steps over `shards` shards of one batch (forward, backward,
    reduction, Adam on batch norm; the discrete weights stay): fused batch norm with the
    triangular window (it keeps copies of gamma and beta), then the classifier's plain one."""
    model = Model("4C3-GAP-3", (6, 6, 2), 3, seed=2, window="tri").to(True)
    sharded = ShardedStep(model, "xent", shards, LocalCollective(), True)
    opt = optimizer("adam")
    acc = zeros((2,), np.float64, True)
    rng = np.random.default_rng(0)
    for t in range(steps):
        x = cuda.to_device(rng.standard_normal((4 * shards, 6, 6, 2)).astype(np.float32))
        y = cuda.to_device(rng.integers(0, 3, 4 * shards).astype(np.int32))
        sharded(x, y, acc)
        opt.step(model.reals, 0.01, t + 1)
    state = model.state_dict()
    grads = {f"g/{p.name}": p.grad.copy_to_host() for p in model.tparams() + model.rparams()}
    return {**grads, **{f"r/{k}": v for k, v in state["real"].items()},
            **{f"b/{k}": v for k, v in state["buffers"].items()}, "acc": acc.copy_to_host()}


def test_sharded_steps_equal_per_call_allocation_and_per_tensor_updates(monkeypatch):
    """Kept per-layer arrays (StepBuffers) and one flat Adam launch give the bits of fresh arrays
    and one launch per tensor, over several steps of two shards each (the arrays are rewritten by
    the second shard's forward after the first shard's backward read them)."""
    kept = sharded_steps()
    monkeypatch.setattr(StepBuffers, "__call__", lambda self, role, shape, dtype: fresh(role, shape, dtype))
    reference = sharded_steps(PerTensorOptimizer)
    assert kept.keys() == reference.keys()
    for k in kept:
        np.testing.assert_array_equal(kept[k], reference[k], err_msg=k)


def test_init_loads_a_cpu_checkpoint_into_a_device_run(micro_data, tmp_path):
    """--init on the device path: a CPU run's checkpoint starts a device run; its weights, batch-norm
    parameters and statistics arrive on the device unchanged, and evaluation agrees with the CPU."""
    from ternet.evaluate import evaluate
    from ternet.train import latest_checkpoint
    base = dict(data=str(micro_data), arch="4C3-MP2-8FC", sampler="dst", epochs=1, batch_size=16, log_every=1,
                eval_batch_size=8)
    cpu_run = RunDir(tmp_path / "cpu")
    cfg = Config(**base, device="cpu").resolve()
    cpu_run.create(cfg)
    cpu = Trainer(cfg, cpu_run, progress=False)
    cpu.fit()
    source = latest_checkpoint(cpu_run)
    dev_cfg = Config(**base, device="cuda", init=str(cpu_run.path)).resolve()
    dev = Trainer(dev_cfg, RunDir(tmp_path / "dev"), progress=False)
    dev.initialize(dev_cfg.init)
    state = dev.model.state_dict()
    for group in ("weights", "real", "buffers"):
        for k, a in state[group].items():
            np.testing.assert_array_equal(a, source[group][k])
    (dev_loss, dev_acc), (cpu_loss, cpu_acc) = (evaluate(t.model, t.eval_loaders["test"], "xent") for t in (dev, cpu))
    assert dev_acc == cpu_acc and dev_loss == pytest.approx(cpu_loss, rel=1e-6)   # the loss: summed in another order
