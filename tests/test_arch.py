"""Architecture strings: presets build the intended nets; bad strings point at the bad token."""
import numpy as np
import pytest

from ternet.arch import ArchError, parse
from ternet.layers import BatchNorm, Conv2d, Linear, MaxPool, Residual, TernaryAct
from ternet.model import Model


def test_lenet_preset_is_the_papers_mnist_net():
    m = Model("lenet", (28, 28, 1), 10)
    kinds = [type(l).__name__ for l in m.net.layers]
    assert kinds == ["Conv2d", "MaxPool", "BNAct", "Conv2d", "MaxPool", "BNAct",
                     "Flatten", "Linear", "BNAct", "Linear", "BatchNorm"]
    # batch norm + ternary activation, fused; inputs of all but the first layer are ternary
    assert [l.int_scale for l in m.net.layers if type(l).__name__ == "BNAct"] == [0, 1, 1]
    shapes = [p.q.shape for p in m.tparams()]
    assert shapes == [(32, 5, 5, 1), (64, 5, 5, 32), (512, 1024), (10, 512)]
    assert all(p.q.dtype == np.int8 for p in m.tparams())


def test_vgg_gxnor_and_resnet18_shapes():
    v = Model("vgg-gxnor", (32, 32, 3), 10)
    assert [p.q.shape[0] for p in v.tparams()] == [128, 128, 256, 256, 512, 512, 1024, 10]
    assert v.tparams()[6].q.shape == (1024, 512 * 4 * 4)
    r = Model("resnet18", (224, 224, 3), 1000)
    conv_shapes = [p.q.shape for p in r.tparams()]
    assert conv_shapes[0] == (64, 7, 7, 3)
    assert conv_shapes[-1] == (1000, 512)
    blocks = [l for l in r.net.layers if isinstance(l, Residual)]
    assert len(blocks) == 8
    assert [b.shortcut is not None for b in blocks] == [False, False, True, False, True, False, True, False]
    assert len(conv_shapes) == 1 + 16 + 3 + 1      # stem, 16 block convs, 3 projections, classifier
    assert r.net.out_shape((224, 224, 3)) == (1000,)


def test_strided_residual_block_shrinks_the_map_once():
    """A residual block with a stride hands the next layer its own output's shape (the builder
    once applied the stride twice: an FC after RB128s2 expected a quarter of its input)."""
    m = Model("64C3-RB64-RB128s2-64FC", (28, 28, 1), 10)
    assert [p.q.shape for p in m.tparams()][-2] == (64, 128 * 14 * 14)
    assert m.forward(np.zeros((2, 28, 28, 1), np.float32), True).shape == (2, 10)


def test_string_tokens():
    specs = parse("2x16C3s2p0-AP2-8FC-RB16s2-GAP-5")
    assert [s.kind for s in specs] == ["conv", "conv", "pool", "fc", "rb", "gap", "classifier"]
    assert specs[0].stride == 2 and specs[0].pad == 0 and specs[2].op == "avg"


@pytest.mark.parametrize("arch,token", [
    ("32C5-MQ2-10", "MQ2"), ("32C5-MP2-foo-10", "foo"), ("0x32C3-10", "0x32C3"), ("32C5-0FC-10", "0FC"),
    ("32C5-1", "1"),
])
def test_bad_string_points_at_token(arch, token):
    with pytest.raises(ArchError) as e:
        parse(arch)
    msg = str(e.value)
    lines = msg.splitlines()
    caret_line = lines[2]
    start = caret_line.index("^") - 2
    assert arch[start:start + len(token)] == token, msg


def test_shrinking_feature_map_and_wrong_class_count():
    with pytest.raises(ArchError, match="shrinks"):
        Model("64C5p0-MP2-64C5p0-MP2-64C5p0-10", (28, 28, 1), 10)
    with pytest.raises(ArchError, match="dataset has 100"):
        Model("lenet", (28, 28, 1), 100)
    assert Model("16C3-MP2-32FC", (8, 8, 1), 7).tparams()[-1].q.shape == (7, 32)
