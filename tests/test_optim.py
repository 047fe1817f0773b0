"""The real-parameter optimizer over the model's flat buffers (model.RealBuffers): one launch gives
the bits of one launch per tensor, its state keeps the per-parameter checkpoint names and
round-trips; the per-layer StepBuffers keep an array per role while its shape stays."""
import numpy as np
import pytest
from numba import cuda

from ternet.kernels import StepBuffers
from ternet.kernels.elementwise import adam_update, sgd_update
from ternet.model import Model
from ternet.optim import RealOptimizer

ARCH = "4C3-MP2-RB8s2-GAP-3"      # BNAct, BatchNorm, a residual block: 5 BN layers of 4 and 8 channels


def model_with_grads(backend, seed=0):
    """A small model on the backend, its real gradients filled with seeded values."""
    m = Model(ARCH, (8, 8, 2), 3, seed=1).to(backend == "cuda")
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(p.value.shape).astype(np.float32) for p in m.rparams()]
    set_grads(m, grads)
    return m, grads


def set_grads(m, grads):
    for p, g in zip(m.rparams(), grads):
        if m.device:
            p.grad.copy_to_device(g)
        else:
            p.grad[...] = g


def host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def per_tensor_steps(m, grads, kind, steps):
    """The reference: one launch per tensor on copies of each on m's side, as before the flat
    buffers (RealOptimizer's hyperparameters); host copies of the values and moments."""
    f32, side = np.float32, (cuda.to_device if m.device else np.array)
    values = {p.name: side(host(p.value)) for p in m.rparams()}
    grads = [side(g) for g in grads]
    moments = {name: [side(np.zeros(v.shape, np.float32)) for _ in range(2 if kind == "adam" else 1)]
               for name, v in values.items()}
    for t in range(1, steps + 1):
        for (name, v), g in zip(values.items(), grads):
            s = moments[name]
            if kind == "adam":
                adam_update(v, g, s[0], s[1], f32(0.01), f32(0.9), f32(0.999), f32(1 - 0.9 ** t),
                            f32(1 - 0.999 ** t), f32(1e-8))
            else:
                sgd_update(v, g, s[0], f32(0.01), f32(0.9))
    return ({name: host(v) for name, v in values.items()},
            {name: [host(a) for a in s] for name, s in moments.items()})


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_flat_update_gives_the_per_tensor_bits(backend, kind):
    m, grads = model_with_grads(backend)
    want, moments = per_tensor_steps(m, grads, kind, 3)
    opt = RealOptimizer(kind)
    for t in range(1, 4):
        opt.step(m.reals, 0.01, t)
    for p in m.rparams():
        np.testing.assert_array_equal(host(p.value), want[p.name], err_msg=p.name)
    state = opt.state_dict()
    assert list(state) == [f"{p.name}/{i}" for p in m.rparams() for i in range(len(moments[p.name]))]
    for key, a in state.items():
        name, i = key.rsplit("/", 1)
        np.testing.assert_array_equal(a, moments[name][int(i)], err_msg=key)


def test_params_are_views_of_the_flat_buffers(backend):
    m, grads = model_with_grads(backend)
    flat = host(m.reals.grad)
    np.testing.assert_array_equal(flat, np.concatenate([g.ravel() for g in grads]))
    before, views = m.state_dict()["real"], [p.value for p in m.rparams()]
    m.load_state_dict({**m.state_dict(), "real": {k: v + 1 for k, v in before.items()}})
    assert all(p.value is v for p, v in zip(m.rparams(), views))      # loading writes into the views
    np.testing.assert_array_equal(host(m.reals.value), np.concatenate([before[p.name] + 1 for p in m.rparams()]))
    with pytest.raises(ValueError, match="saved shape"):
        m.load_state_dict({**m.state_dict(), "real": {k: np.zeros(7, np.float32) for k in before}})


def test_state_round_trips_and_loads_before_the_first_step(backend):
    """A checkpoint's optimizer state ('<param>/<i>' arrays) loaded into a fresh optimizer and
    model continues bit for bit, also after the model moved away and back (new flat buffers)."""
    a, grads = model_with_grads(backend)
    opt_a = RealOptimizer("adam")
    for t in (1, 2):
        opt_a.step(a.reals, 0.01, t)
    saved_model, saved_opt = a.state_dict(), opt_a.state_dict()
    b = Model(ARCH, (8, 8, 2), 3, seed=1).to(backend == "cuda")
    b.load_state_dict(saved_model)
    set_grads(b, grads)
    opt_b = RealOptimizer("adam")
    opt_b.load_state_dict(saved_opt)
    assert opt_b.state_dict().keys() == saved_opt.keys()       # saved again before a step: the same
    opt_a.step(a.reals, 0.01, 3)
    opt_b.step(b.reals, 0.01, 3)
    np.testing.assert_array_equal(host(a.reals.value), host(b.reals.value))
    b.to(not b.device).to(not b.device)                          # new buffers: the moments follow
    set_grads(b, grads)
    opt_b.step(b.reals, 0.01, 4)
    opt_a.step(a.reals, 0.01, 4)
    np.testing.assert_array_equal(host(a.reals.value), host(b.reals.value))


@pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device or simulator")
def test_step_buffers_keep_one_array_per_role_and_shape():
    kept = StepBuffers()
    a = kept("mean", 8, np.float32)
    assert kept("mean", (8,), np.float32) is a                  # same role, shape, dtype: the same array
    assert kept("invstd", 8, np.float32) is not a               # another role
    b = kept("mean", 16, np.float32)                            # another shape (e.g. another batch): a new one
    assert b is not a and b.shape == (16,)
    assert kept("mean", 16, np.int32).dtype == np.int32
    assert kept("mean", 16, np.int32) is kept("mean", 16, np.int32)
