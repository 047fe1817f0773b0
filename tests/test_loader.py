"""The loader (ternet/loader.py) and its kernels (ternet/augment.py): batches are a pure function
of (seed, epoch, batch) - exact resume, independent of threads, prefetch and in-memory mode - and
the augmentations match numpy references. Synthetic data only. Run: python -m pytest tests/test_loader.py
"""
import numpy as np
import pytest

from data_prep.pack import pack_arrays
from ternet import augment as aug
from ternet import rng
from ternet.loader import Loader
from ternet.shards import open_dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """57 train + 10 test images of 8x8x3 in shards of 10; labels = index % 5."""
    out = tmp_path_factory.mktemp("small")
    gen = np.random.default_rng(0)
    pack_arrays(out, {"train": (gen.integers(0, 256, (57, 8, 8, 3), dtype=np.uint8),
                                np.arange(57) % 5),
                      "test": (gen.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
                               np.arange(10) % 5)}, list("abcde"), shard_size=10)
    return open_dataset(out)


@pytest.fixture(scope="module")
def variable(tmp_path_factory):
    """12 images with short side 16 and long sides 16..27 (variable layout)."""
    out = tmp_path_factory.mktemp("variable")
    gen = np.random.default_rng(1)
    images = gen.integers(0, 256, (12, 20, 33, 3), dtype=np.uint8)
    pack_arrays(out, {"train": (images, np.arange(12) % 3)}, list("abc"), size=16, crop=False,
                shard_size=5)
    return open_dataset(out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """40 train images of 28x28x1 (the MNIST size) in shards of 16."""
    out = tmp_path_factory.mktemp("digits")
    gen = np.random.default_rng(2)
    pack_arrays(out, {"train": (gen.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8), np.arange(40) % 4)},
                list("abcd"), shard_size=16)
    return open_dataset(out)


def _epoch(loader, epoch, start=0, raw=False):
    return [(x.copy(), y.copy()) for x, y in loader.batches(epoch, start=start, raw=raw)]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("augment", ["crop-flip", "crop", "rrc-flip", "none"])
def test_resume_threads_prefetch_and_memory_mode_do_not_change_batches(small, augment):
    ref = _epoch(Loader(small, "train", 8, augment=augment, seed=4, threads=1, prefetch=0,
                        in_memory=True), 3)
    assert len(ref) == 7                                            # drop_last with shuffle
    for kw in ({"threads": 3, "prefetch": 4, "in_memory": False}, {"threads": 2, "prefetch": 1}):
        loader = Loader(small, "train", 8, augment=augment, seed=4, **kw)
        _same(_epoch(loader, 3), ref)
        _same(_epoch(loader, 3, start=5), ref[5:])                 # exact mid-epoch resume
    assert not np.array_equal(_epoch(Loader(small, "train", 8, augment=augment, seed=4), 4)[0][0],
                              ref[0][0])


def test_crop_shifts_like_crop_flip_but_never_mirrors(small):
    a = Loader(small, "train", 8, augment="crop", seed=4)
    b = Loader(small, "train", 8, augment="crop-flip", seed=4)
    assert a.pad == b.pad > 0
    flips = []
    for batch in range(3):
        (ia, (oya, oxa, fa)), (ib, (oyb, oxb, fb)) = a.plan(0, batch, a._order(0)), b.plan(0, batch, b._order(0))
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(oya, oyb)           # the same shifts
        np.testing.assert_array_equal(oxa, oxb)
        assert not fa.any()
        flips.append(fb)
    assert np.concatenate(flips).any()


@pytest.mark.parametrize("in_memory", [True, False])
def test_windowed_shuffle_is_a_permutation_in_shard_windows(small, in_memory):
    loader = Loader(small, "train", 8, shuffle_window=20, in_memory=in_memory)
    order = loader._order(0)
    assert sorted(order) == list(range(57))
    shard = order // 10
    # Windows of >= 20 images = 2 whole shards (6 shards: 2+2+2): each window's images
    # come from exactly two shards.
    windows = [set(shard[a:b]) for a, b in ((0, 20), (20, 40), (40, 57))]
    assert sorted(len(w) for w in windows) == [2, 2, 2] and set().union(*windows) == set(range(6))
    assert not np.array_equal(loader._order(0), loader._order(1))


def test_eval_batches_are_the_normalised_split_in_file_order(small):
    images, labels = small.load_split("test")
    loader = Loader(small, "test", 4, shuffle=False, augment="none")
    got = _epoch(loader, 0)
    assert [len(y) for _, y in got] == [4, 4, 2]                   # no drop_last when not shuffling
    x = np.concatenate([b[0] for b in got])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), labels)
    ref = (images / 255.0 - small.mean) / small.std
    np.testing.assert_allclose(x, ref, atol=1e-5)                  # float32 rounding
    raw = np.concatenate([b[0] for b in _epoch(loader, 0, raw=True)])
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, images)


def test_labels_follow_images_through_the_shuffle(small):
    images, labels = small.load_split("train")
    loader = Loader(small, "train", 8, augment="none", drop_last=False, seed=9)
    order = loader._order(2)
    for b, (x, y) in enumerate(loader.batches(2, raw=True)):
        idx = order[b * 8:(b + 1) * 8]
        np.testing.assert_array_equal(y, labels[idx])
        np.testing.assert_array_equal(x, images[idx])


def test_crop_flip_matches_numpy_reference(small):
    images, labels = small.load_split("train")
    loader = Loader(small, "train", 16, augment="crop-flip", seed=1)
    assert loader.pad == 1 and loader.output_shape == (8, 8, 3)
    order = loader._order(0)
    x, _ = next(loader.batches(0, start=2, raw=True))
    idx = order[32:48]
    oy, ox, flip = aug.draw_crop_flip(rng.generator(1, "augment", 0, 2),
                                      np.full((16, 2), 8), (8, 8), 1)
    padded = np.pad(images[idx], ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(16):
        ref = padded[i, oy[i] + 1:oy[i] + 9, ox[i] + 1:ox[i] + 9]
        np.testing.assert_array_equal(x[i], ref[:, ::-1] if flip[i] else ref)
    assert 0 < flip.sum() < 16 and len(set(zip(oy, ox))) > 1


@pytest.mark.parametrize("augment", ["crop", "crop-flip"])
def test_crop_pad_bounds_the_shifts_and_pads_with_zeros(small, augment):
    images, _ = small.load_split("train")
    loader = Loader(small, "train", 16, augment=augment, seed=1, crop_pad=3)
    assert loader.pad == 3
    order, shifts, n = loader._order(0), [], 3
    for b, (x, _) in enumerate(loader.batches(0, raw=True)):
        idx, (oy, ox, flip) = loader.plan(0, b, order)
        shifts += [oy, ox]           # stored size = output size: the centred window is at 0
        padded = np.pad(images[idx], ((0, 0), (n, n), (n, n), (0, 0)))
        for i in range(len(idx)):
            ref = padded[i, oy[i] + n:oy[i] + n + 8, ox[i] + n:ox[i] + n + 8]
            np.testing.assert_array_equal(x[i], ref[:, ::-1] if flip[i] else ref)
        assert flip.any() == (augment == "crop-flip")
    shifts = np.concatenate(shifts)
    assert shifts.min() == -n and shifts.max() == n    # 96 draws reach +-3, none beyond


def test_crop_pad_0_is_the_automatic_round_h_over_8(digits):
    auto = Loader(digits, "train", 8, augment="crop", seed=2)
    assert auto.pad == 4                                # round(28 / 8): too much for digits
    # the draws before --crop-pad existed: pad max(1, round(H/8)), from the batch's own stream
    idx, params = auto.plan(0, 1, auto._order(0))
    ref = aug.draw_crop_flip(rng.generator(2, "augment", 0, 1), np.full((8, 2), 28), (28, 28), 4, False)
    for a, b in zip(params, ref):
        np.testing.assert_array_equal(a, b)
    _same(_epoch(auto, 0), _epoch(Loader(digits, "train", 8, augment="crop", seed=2, crop_pad=4), 0))
    two = Loader(digits, "train", 8, augment="crop", seed=2, crop_pad=2)
    draws = np.concatenate([np.concatenate(two.plan(0, b, two._order(0))[1][:2]) for b in range(len(two))])
    assert two.pad == 2 and set(draws) == {-2, -1, 0, 1, 2}


def test_resized_crop_kernel_is_exact_on_whole_boxes_and_linear_ramps():
    h, w, c = 6, 10, 2
    ramp = (np.arange(w)[None, :, None] * 20 + np.arange(h)[:, None, None] * 3
            + np.arange(c) * 7).astype(np.uint8)
    args = (ramp.reshape(-1), np.zeros(1, np.int64), np.full(1, h, np.int32),
            np.full(1, w, np.int32), np.zeros(2, np.int64), np.arange(2))
    one, zero = np.ones(c, np.float32), np.zeros(c, np.float32)
    out = np.zeros((2, h, w, c), np.uint8)
    boxes = np.array([[0, 0, h, w]] * 2, np.float64)
    aug.resized_crop(*args, boxes, np.array([False, True]), one, zero + 0.5, out)
    np.testing.assert_array_equal(out[0], ramp)
    np.testing.assert_array_equal(out[1], ramp[:, ::-1])
    # Halving a linear ramp: bilinear sampling at the box's pixel centres is exact.
    half = np.zeros((1, 3, 5, c), np.float32)
    aug.resized_crop(*args[:4], np.zeros(1, np.int64), np.zeros(1, np.int64), boxes[:1],
                     np.array([False]), one, zero, half)
    ys, xs = np.arange(3) * 2 + 0.5, np.arange(5) * 2 + 0.5
    ref = xs[None, :, None] * 20 + ys[:, None, None] * 3 + np.arange(c) * 7
    np.testing.assert_allclose(half[0], ref, atol=1e-4)


def test_random_resized_crop_boxes_fit_and_follow_the_ranges():
    hw = np.array([[16, 27], [16, 16], [40, 16], [2, 300]] * 50)
    boxes, flips = aug.draw_resized_crop(np.random.default_rng(0), hw)
    y0, x0, bh, bw = boxes.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (y0 + bh <= hw[:, 0]).all() and (x0 + bw <= hw[:, 1]).all()
    normal = hw[:, 0] != 2            # the 2x300 strip can only use the fallback
    frac = (bh * bw / hw.prod(1))[normal]
    assert frac.min() > 0.05 and frac.max() <= 1.0 and 0.2 < flips.mean() < 0.8
    # No box of >= 8% of a 2x300 strip has an aspect ratio <= 4/3: the fallback is the centred
    # box with the ratio clamped, 2 x round(2 * 4/3).
    np.testing.assert_array_equal(boxes[~normal], np.tile([0, 148, 2, 3], (50, 1)))


def test_variable_layout_random_resized_crop_and_center_crop(variable):
    loader = Loader(variable, "train", 4, seed=2)
    assert loader.augment == "rrc-flip" and loader.output_shape == (16, 16, 3)
    x, y = next(loader.batches(0))
    assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32 and np.isfinite(x).all()
    _same(_epoch(loader, 1, start=1), _epoch(Loader(variable, "train", 4, seed=2,
                                                    in_memory=False, threads=1), 1)[1:])
    images, labels = variable.load_split("train")
    evals = _epoch(Loader(variable, "train", 12, shuffle=False, augment="none"), 0, raw=True)
    np.testing.assert_array_equal(evals[0][0], images)
    np.testing.assert_array_equal(evals[0][1], labels)


def test_bad_arguments(small):
    with pytest.raises(ValueError, match="augment"):
        Loader(small, "train", 8, augment="mixup")
    with pytest.raises(KeyError, match="no split 'val'"):
        Loader(small, "val", 8)
    with pytest.raises(ValueError, match="start"):
        next(Loader(small, "train", 8).batches(0, start=99))
    with pytest.raises(ValueError, match="crop_pad=-1"):
        Loader(small, "train", 8, augment="crop", crop_pad=-1)
    for augment in ("none", "rrc-flip"):
        with pytest.raises(ValueError, match=f"crop_pad=2.*{augment}"):
            Loader(small, "train", 8, augment=augment, crop_pad=2)


@pytest.mark.parametrize("augment", ["crop-flip", "rrc-flip", "none"])
def test_cutout_sets_one_clipped_square_to_the_mean_and_leaves_the_rest(small, augment):
    """With cutout, each image equals the batch without it except one square around the drawn
    centre (clipped at the edges), which holds the mean: 0 normalised, round(255 mean) raw."""
    kw = dict(shuffle=True, augment=augment, seed=5, output_size=6 if augment == "rrc-flip" else None)
    plain, cut = Loader(small, "train", 8, **kw), Loader(small, "train", 8, cutout=3, **kw)
    order = cut._order(1)
    for raw in (False, True):
        fill = np.round(255 * small.mean).astype(np.uint8) if raw else np.zeros(3, np.float32)
        for b, ((xa, _), (xb, _)) in enumerate(zip(_epoch(plain, 1, raw=raw), _epoch(cut, 1, raw=raw))):
            _, params = cut.plan(1, b, order)
            cy, cx = params[-2:]
            h, w = xa.shape[1:3]
            for p in range(len(xa)):
                inside = np.zeros((h, w), bool)
                inside[max(0, cy[p] - 1):cy[p] + 2, max(0, cx[p] - 1):cx[p] + 2] = True
                np.testing.assert_array_equal(xb[p][~inside], xa[p][~inside])
                assert (xb[p][inside] == fill).all() and inside.sum() >= 4
    with pytest.raises(ValueError, match="cutout=-1"):
        Loader(small, "train", 8, cutout=-1)
