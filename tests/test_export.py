"""Export and the integer-only reference: thresholds checked exhaustively over every reachable
accumulator against the float evaluator's kernels (negative scales, zero variance, gamma = 0,
exact ties, average pooling, pooling on either side of batch norm, residual adds), integer vs
float predictions, file round trips, trit packing and the CUTIE target check.
Run: python -m pytest tests/test_export.py -q
"""
import numpy as np
import pytest

from ternet import exportio, intref
from ternet.export import bn_eval_affine, fold, input_lut, thresholds
from ternet.kernels.batchnorm import batchnorm_forward_eval, bn_act_forward_eval
from ternet.kernels.pool import avgpool_forward
from ternet.layers import BatchNorm, BNAct, walk
from ternet.model import Model
from ternet.targets import check_cutie

NORM1 = (np.float32([1 / (255 * 0.353)]), np.float32([-0.286 / 0.353]))
NORM3 = (np.float32([1 / (255 * 0.25)] * 3), np.float32([-1.9, -2.0, -1.8]))


def randomize(model, seed=0, special=True):
    """Batch-norm statistics of a trained-looking net, plus the awkward channels: negative
    gamma (about half), zero running variance, gamma = 0 and gamma = -0.0."""
    g = np.random.default_rng(seed)
    for layer in walk(model.net):
        if isinstance(layer, BatchNorm):
            c = layer.c
            layer.gamma.value[:] = g.normal(0, 1, c)
            layer.beta.value[:] = g.normal(0, 1, c)
            layer.running_mean[:] = g.normal(0, 2, c)
            layer.running_var[:] = g.uniform(0.5, 10, c)
            if special and c >= 4:
                layer.running_var[0] = 0.0
                layer.gamma.value[1] = 0.0
                layer.gamma.value[2] = -0.0
                layer.running_var[3], layer.gamma.value[3] = 0.0, -2.0
    return model


def images(shape, n=48, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n,) + tuple(shape), dtype=np.uint8)


def float_logits(model, px, norm):
    lut = input_lut(*norm)          # the loader's own rounding, pixel by pixel
    x = lut[np.arange(px.shape[-1]), px]
    return np.asarray(model.forward(x, train=False))


def bn_of(model, name):
    return next(layer for layer in walk(model.net) if layer.name == name)


# ----------------------------------------------------------------------------------------------
# the threshold search

def test_round_f32_is_float32_rounding():
    g = np.random.default_rng(0)
    v = g.integers(-2 ** 52, 2 ** 52, 20000) >> g.integers(0, 50, 20000)
    ties = (g.integers(1, 2 ** 24, 2000) << 6) | 32          # exactly half an ulp above 24 bits
    v = np.concatenate([v, ties, -ties, [0, 1, -1, 2 ** 24 - 1, 2 ** 24 + 1, 2 ** 25 + 3]]).astype(np.int64)
    got = np.array([intref.round_f32(int(x)) for x in v], np.int64)
    want = np.ldexp(v.astype(np.float64), -30).astype(np.float32).astype(np.float64)   # float64 holds v exactly
    np.testing.assert_array_equal(np.ldexp(got.astype(np.float64), -30), want)


def test_thresholds_step_function_with_clamping():
    # decide = +1 above 5, -1 below -3 (inclusive steps), one channel constant +1, one constant -1
    def decide(a):
        out = np.where(a > 5, 1, np.where(a < -3, -1, 0)).astype(np.int8)
        out[..., 1] = 1
        out[..., 2] = -1
        return out
    lo, hi = thresholds(decide, 10, (1, 3))
    # a constant channel has an empty zero band (lo = hi + 1) just outside the reachable range
    assert lo[0].tolist() == [-3, -10, 11] and hi[0].tolist() == [5, -11, 10]


def _exhaustive(model, bn_name, node_name, pooled_area=1):
    """Every reachable accumulator A of a hidden threshold node: the integer rule (with the
    folded channel flips and signs) against the float evaluator's bn_act_forward_eval."""
    net = fold(model, NORM1 if model.in_shape[-1] == 1 else NORM3)
    node = net.by_name[node_name]
    src = net.by_name[node["inputs"][0]]
    conv = net.by_name[src["inputs"][0]] if src["op"] in ("maxpool", "sumpool") else src
    bound = src["bound"]
    a = np.arange(-bound, bound + 1)[:, None].repeat(len(net.arr(node, "lo")), 1)
    bn = bn_of(model, bn_name)
    # the documented rule: negative scale negates the channel's weights unless a max pool
    # sits between conv and BN (then the node's sign is -1 instead)
    neg = bn_eval_affine(bn)[0] < 0
    flip = np.where(neg & (src["op"] != "maxpool"), -1, 1)
    x = a.astype(np.float32) / np.float32(model.qmax)
    if pooled_area > 1:     # the float path's average pooling of a window whose sum is A
        k = int(round(pooled_area ** 0.5))
        win = np.zeros((len(a), k, k, a.shape[1]), np.float32)
        win[:, 0, 0] = x
        y = np.empty((len(a), 1, 1, a.shape[1]), np.float32)
        avgpool_forward(y, win, k, k, 0)
        x = y.reshape(a.shape)
    want = np.empty(a.shape, np.int8)
    bn_act_forward_eval(want, x, bn.gamma.value, bn.beta.value, bn.running_mean, bn.running_var, bn.eps, bn.act.r)
    acc = a * flip
    got = intref._tern(acc, net.arr(node, "lo"), net.arr(node, "hi")) * net.arr(node, "sign")
    bad = np.argwhere(got != want)
    assert len(bad) == 0, f"first mismatches (A, channel): {bad[:5].tolist()}"
    return net, bn


def test_thresholds_exhaustive_fc_with_negative_and_degenerate_channels():
    m = randomize(Model("4C3-MP2-16FC-6", (6, 6, 1), 6, seed=3))
    net, bn = _exhaustive(m, "bn2", "act2")
    scale, _ = bn_eval_affine(bn)
    assert (scale < 0).any() and (scale > 0).any()
    lo, hi = net.arr("act2", "lo"), net.arr("act2", "hi")
    b = net.by_name["fc1"]["bound"]
    # gamma = 0 and -0.0: constant channels, thresholds clamped to the reachable range +-(B+1)
    for c in (1, 2):
        assert {int(lo[c]), int(hi[c])} <= {-b - 1, b + 1, b, -b}


def test_thresholds_exhaustive_max_pool_before_bn_keeps_the_sign():
    # conv -> max pool -> BN with negative scales, and no linear consumer to take the sign
    m = randomize(Model("8C3-MP2-8C3-MP2-MP2-4", (12, 12, 1), 4, seed=4))
    net, bn = _exhaustive(m, "bn2", "act2")
    neg = bn_eval_affine(bn)[0] < 0
    assert (net.arr("act2", "sign")[neg] == -1).all() and (net.arr("act2", "sign")[~neg] == 1).all()


@pytest.mark.parametrize("k", [2, 3])
def test_thresholds_exhaustive_average_pool_before_bn(k):
    m = randomize(Model(f"4C3-MP2-8C3-AP{k}-4", (12, 12, 1), 4, seed=5))
    net, _ = _exhaustive(m, "bn2", "act2", pooled_area=k * k)
    assert net.by_name["pool2"]["op"] == "sumpool" and net.by_name["act2"]["match"] == "bitwise"


def test_thresholds_at_exact_ties():
    # choose beta so that y(A0) = r exactly in float32 (and -r at -A0): phi gives 0 there
    m = randomize(Model("4C3-MP2-8FC-3", (6, 6, 1), 3, seed=6), special=False)
    bn = bn_of(m, "bn2")
    bn.running_mean[:] = 0
    s, _ = bn_eval_affine(bn)
    s = np.abs(s)
    bn.gamma.value[:] = np.abs(bn.gamma.value)
    a0 = 3
    p = np.float32(a0) * s
    bn.beta.value[:] = np.float32(1.0) - p           # exact (Sterbenz) when p is in [0.5, 2]
    y = np.empty((2, 8), np.float32)
    batchnorm_forward_eval(y, np.float32([[a0] * 8, [a0 + 1] * 8]), bn.gamma.value, bn.beta.value,
                           bn.running_mean, bn.running_var, bn.eps)
    tie = y[0] == np.float32(1.0)
    assert tie.sum() >= 2, "the test needs channels whose boundary falls exactly on an integer"
    net, _ = _exhaustive(m, "bn2", "act2")
    assert (net.arr("act2", "hi")[tie] == a0).all()     # y == r is not > r: +1 starts at A0 + 1


# ----------------------------------------------------------------------------------------------
# whole networks: integer predictions against the float path

ARCHS = [
    ("8C5p0-MP2-16C5p0-MP2-32FC-10", (28, 28, 1)),     # lenet order: conv -> max pool -> BN
    ("8C3-AP3-16C3s2-MP2-32FC-10", (16, 16, 1)),       # average pooling of the input layer
    ("8C3-MP2-AP2-16C3-AP3-10", (16, 16, 3)),          # pools on both sides of BN
    ("stem8-RB8-RB16s2-GAP-10", (32, 32, 3)),          # residual blocks, identity and projection
]


@pytest.mark.parametrize("arch,shape", ARCHS)
@pytest.mark.parametrize("engine", ["int", "f32"])
def test_integer_predictions_match_float(arch, shape, engine):
    norm = NORM1 if shape[-1] == 1 else NORM3
    m = randomize(Model(arch, shape, 10, seed=7))
    net = fold(m, norm)
    px = images(shape)
    fl = float_logits(m, px, norm)
    il = intref.run(net, px, engine)
    np.testing.assert_array_equal(np.argmax(il, 1), np.argmax(fl, 1))
    e = net.by_name["logits"]["frac_bits"]
    if net.by_name["logits"]["match"] == "bitwise":
        # the float32 logits themselves, as fixed-point integers
        np.testing.assert_array_equal(il, np.ldexp(fl.astype(np.float64), e).astype(np.int64))
    else:   # a non-power-of-two average pool before a GEMM: the float path rounds elsewhere too
        np.testing.assert_allclose(il / 2.0 ** e, fl, rtol=1e-5, atol=1e-5)
    exact = intref.run(fold(m, norm, rounding="exact"), px, engine)
    np.testing.assert_allclose(exact / 2.0 ** e, fl, rtol=1e-5, atol=1e-5)    # unrounded sums and logits


@pytest.mark.parametrize("arch,shape", [
    ("16C3-MP2-10", (16, 16, 3)),            # 27 taps with zero padding
    ("16C3-AP3-10", (15, 15, 3)),            # average pooling of the first layer's float sums
    ("64FC-10", (28, 28, 1)),                # 784 taps: a GEMM long enough to be blocked along k
    ("stem16-GAP-10", (32, 32, 3)),          # 7x7 stride 2, 147 taps
])
def test_first_layer_is_bitwise_the_float_path(arch, shape):
    """The first layer sums real-valued inputs; the integer path reproduces the float32 GEMM's
    rounding (taps in order), so its activations equal the float path's everywhere."""
    norm = NORM1 if shape[-1] == 1 else NORM3
    m = randomize(Model(arch, shape, 10, seed=14))
    net = fold(m, norm)
    assert net.by_name["act1"]["match"] == "bitwise"
    px = images(shape, 64)
    x = input_lut(*norm)[np.arange(shape[-1]), px]
    for layer in m.net.layers:
        x = layer.forward(x, False)
        if isinstance(layer, BNAct):
            break
    got = intref.run(net, px, keep=["act1"])["act1"].astype(np.int64)
    got[..., net.by_name["act1"].get("negated", [])] *= -1
    np.testing.assert_array_equal(got, x)
    exact = fold(m, norm, rounding="exact")
    first = lambda n: next(x for x in n.nodes if x["op"] in ("conv", "linear"))    # noqa: E731
    assert exact.by_name["act1"]["match"] == "rounding" and "accumulate" not in first(exact)
    assert first(net)["accumulate"] == "float32"


@pytest.mark.parametrize("bits", [2, 3])
def test_more_weight_states_fold_exactly(bits):
    m = randomize(Model("8C3-MP2-16C3-MP2-16FC-10", (12, 12, 3), 10, bits=bits, seed=13))
    net = fold(m, NORM3)
    assert np.abs(net.arr("conv2", "weight")).max() == 2 ** (bits - 1)
    px = images((12, 12, 3))
    np.testing.assert_array_equal(np.argmax(intref.run(net, px), 1), np.argmax(float_logits(m, px, NORM3), 1))
    _exhaustive(m, "bn3", "act3")


def test_engines_agree_bit_for_bit():
    m = randomize(Model("8C3-MP2-16C3-MP2-16FC-10", (12, 12, 3), 10, seed=8))
    net = fold(m, NORM3)
    px = images((12, 12, 3), 20)
    keep = [n["name"] for n in net.nodes]
    a, b = intref.run(net, px, "int", keep), intref.run(net, px, "f32", keep)
    for k in keep:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


def test_classifier_exact_float_tie_picks_the_first_class():
    m = randomize(Model("4C3-MP2-8FC-3", (6, 6, 1), 3, seed=9))
    cls = next(x for x in walk(m.net) if x.name == "classifier")
    cls.w.q[2] = cls.w.q[0]
    bn = bn_of(m, "bn3")
    for arr in (bn.gamma.value, bn.beta.value, bn.running_mean, bn.running_var):
        arr[2] = arr[0]
    net = fold(m, NORM1)
    px = images((6, 6, 1), 64)
    fl, il = float_logits(m, px, NORM1), intref.run(net, px)
    assert (fl[:, 0] == fl[:, 2]).all() and (il[:, 0] == il[:, 2]).all()
    np.testing.assert_array_equal(np.argmax(il, 1), np.argmax(fl, 1))
    assert 2 not in np.argmax(il, 1)


def test_bn_eval_affine_is_the_kernels_affine():
    bn = BNAct("bn", 64)
    g = np.random.default_rng(2)
    bn.gamma.value[:], bn.beta.value[:] = g.normal(0, 1, 64), g.normal(0, 1, 64)
    bn.running_mean[:], bn.running_var[:] = g.normal(0, 3, 64), g.uniform(0, 5, 64)
    x = g.normal(0, 50, (100, 64)).astype(np.float32)
    y = np.empty_like(x)
    batchnorm_forward_eval(y, x, bn.gamma.value, bn.beta.value, bn.running_mean, bn.running_var, bn.eps)
    s, b = bn_eval_affine(bn)
    # the kernels' affine step: f32(f64(x) * f64(scale) + f64(shift)), FMA-proof on both paths
    want = (x.astype(np.float64) * s.astype(np.float64) + b.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(y, want)


# ----------------------------------------------------------------------------------------------
# files

@pytest.mark.parametrize("fmt", ["npz", "h5", "cutie"])
def test_roundtrip_is_the_identical_network(tmp_path, fmt):
    m = randomize(Model("stem8-RB8-RB16s2-GAP-10", (16, 16, 3), 10, seed=10))
    net = fold(m, NORM3)
    path = tmp_path / ("exp" if fmt == "cutie" else f"exp.{fmt}")
    exportio.write(net, path, fmt, **({"pack": ("2bit", "5trit")} if fmt == "cutie" else {}))
    back = exportio.read(path)
    assert back.same_as(net)
    px = images((16, 16, 3), 8)
    np.testing.assert_array_equal(intref.run(back, px), intref.run(net, px))


def test_cutie_folder_layout(tmp_path):
    m = randomize(Model("16C3-MP2-32C3-MP2-10", (12, 12, 1), 10, seed=11))
    net = fold(m, NORM1)
    exportio.write(net, tmp_path / "c", "cutie", name="tiny", pack=("2bit", "5trit"))
    import json
    cfg = json.loads((tmp_path / "c" / "tiny_l1_config.json").read_text())
    assert cfg["conv_type"] == "2d" and cfg["conv_in_ch"] == 16 and cfg["conv_out_ch"] == 32
    assert cfg["conv_k"] == [3, 3] and cfg["pooling"] and cfg["pool_type"] == "max" and not cfg["fp_out"]
    w = np.load(tmp_path / "c" / "tiny_l1_weights.npy")
    assert w.dtype == np.int8 and w.shape == (32, 16, 3, 3)
    np.testing.assert_array_equal(w, net.arr("conv2", "weight").transpose(0, 3, 1, 2))
    assert np.load(tmp_path / "c" / "tiny_l1_thresh_lo.npy").dtype == np.int32
    np.testing.assert_array_equal(exportio.unpack_2bit(np.load(tmp_path / "c" / "tiny_l1_weights_2bit.npy"), w.size),
                                  w.reshape(-1))
    last = json.loads((tmp_path / "c" / "tiny_l2_config.json").read_text())
    assert last["fp_out"] and last["conv_type"] == "dense"


def test_cutie_export_never_replaces_an_unrelated_folder(tmp_path):
    net = fold(Model("4C3-MP2-3", (6, 6, 1), 3), NORM1)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(intref.IntNetError, match="not an earlier CUTIE export"):
        exportio.write(net, tmp_path, "cutie")
    exportio.write(net, tmp_path / "c", "cutie")
    exportio.write(net, tmp_path / "c", "cutie")        # an earlier export is replaced
    assert (tmp_path / "keep.txt").exists() and exportio.read(tmp_path / "c").same_as(net)


def test_wrong_format_version_says_what_to_do(tmp_path):
    net = fold(Model("4C3-MP2-3", (6, 6, 1), 3), NORM1)
    p = tmp_path / "old.npz"
    np.savez(p, __graph__=np.array(net.graph_json().replace('"version": 1', '"version": 0')), **net.arrays)
    with pytest.raises(intref.IntNetError, match="HINT: re-run `ternet export`"):
        exportio.read(p)


@pytest.mark.parametrize("n", [1, 4, 5, 7, 16, 17, 33])
def test_trit_packing_roundtrip(n):
    t = np.random.default_rng(n).integers(-1, 2, n).astype(np.int8)
    b2, b5 = exportio.pack_2bit(t), exportio.pack_5trit(t)
    assert len(b2) == -(-n // 4) and len(b5) == -(-n // 5) and b5.max(initial=0) <= 242
    np.testing.assert_array_equal(exportio.unpack_2bit(b2, n), t)
    np.testing.assert_array_equal(exportio.unpack_5trit(b5, n), t)


def test_trit_codes():
    assert exportio.pack_2bit([1, -1, 0, 1]).tolist() == [0b01_00_11_01]
    assert exportio.pack_5trit([-1, 0, 1, -1, -1]).tolist() == [0 + 1 * 3 + 2 * 9]


# ----------------------------------------------------------------------------------------------
# the CUTIE target check

def test_cutie_sized_net_has_no_findings():
    m = randomize(Model("32C3-MP2-64C3-MP2-96C3-MP2-10", (28, 28, 1), 10, seed=12))
    layers, findings, notes = check_cutie(fold(m, NORM1))
    assert len(layers) == 4 and findings == []
    assert [n.rule for n in notes] == ["input"]


def test_resnet18_violations_are_listed_precisely():
    m = Model("resnet18", (224, 224, 3), 1000)
    layers, findings, _ = check_cutie(fold(m, NORM3))
    got = {(f.layer, f.rule) for f in findings}
    assert len(layers) == 21
    assert {(0, "kernel"), (0, "feature_map"), (0, "padding"), (0, "pooling"), (None, "layers")} <= got
    residual = sorted(f.layer for f in findings if f.rule == "residual")
    assert residual == [2, 4, 6, 7, 9, 11, 12, 14, 16, 17, 19]     # 8 adds + 3 projections
    assert {f.layer for f in findings if f.rule == "kernel"} == {0, 7, 12, 17}   # 7x7 stem, 1x1 projections
    assert {f.layer for f in findings if f.rule == "channels"} == set(range(5, 21))
    assert (20, "pooling") in got                       # global average pooling
    assert next(f for f in findings if f.rule == "layers").message == "21 layers (max 8)"


def test_more_weight_states_are_a_finding():
    m = Model("16C3-MP2-10", (6, 6, 1), 10, bits=2)
    net = fold(m, NORM1)
    assert net.arr("conv1", "weight").max() <= 2
    assert [f.rule for f in check_cutie(net)[1]] == ["weights"]
