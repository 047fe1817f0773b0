"""The GPU-resident loader makes the host loader's batches (simulator on machines without a GPU)."""
import itertools

import numpy as np
import pytest

from cudacheck import needs_cuda
from ternet.loader import Loader
from ternet.shards import open_dataset

pytestmark = needs_cuda


@pytest.mark.parametrize("augment, crop_pad, cutout", [("none", 0, 0), ("crop-flip", 0, 0), ("crop", 0, 0),
                                                       ("crop", 2, 0), ("rrc-flip", 0, 0), ("crop-flip", 0, 8),
                                                       ("rrc-flip", 0, 5)])
def test_device_batches_equal_host_batches(tiny_data, augment, crop_pad, cutout):
    from ternet.device_data import DeviceLoader
    ds = open_dataset(tiny_data)
    kw = dict(shuffle=True, augment=augment, seed=3, in_memory=True, crop_pad=crop_pad, cutout=cutout,
              output_size=24 if augment == "rrc-flip" else None)
    host = Loader(ds, "train", 8, **kw)
    dev = DeviceLoader(Loader(ds, "train", 8, **kw))
    assert dev.host.pad == host.pad == (crop_pad or (4 if augment.startswith("crop") else 0))
    # three batches from the third on: the device takes views at offsets of one upload of the plan
    pairs = list(itertools.islice(zip(host.batches(1, start=2), dev.batches(1, start=2)), 3))
    assert len(pairs) == 3
    for (hx, hy), (dx, dy) in pairs:
        np.testing.assert_array_equal(dy.copy_to_host(), hy)
        # same draws, same gather; normalisation may differ in the last float32 bit (fused multiply-add)
        np.testing.assert_allclose(dx.copy_to_host(), hx, rtol=1e-6, atol=1e-6)


def test_mirror_on_the_device_is_the_host_mirror():
    from numba import cuda
    from ternet.evaluate import mirror
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 2)).astype(np.float32)
    got = mirror(cuda.to_device(x)).copy_to_host()
    np.testing.assert_array_equal(got, mirror(x))
    np.testing.assert_array_equal(got[:, :, 0], x[:, :, -1])


def test_device_parts_make_up_the_batch(tiny_data):
    from ternet.device_data import DeviceLoader
    kw = dict(shuffle=True, augment="crop-flip", seed=3, in_memory=True)
    dev = DeviceLoader(Loader(open_dataset(tiny_data), "train", 8, **kw))
    whole = next(dev.batches(1, start=2))
    parts = [next(dev.batches(1, start=2, part=(i, 2))) for i in range(2)]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([p[k].copy_to_host() for p in parts]), whole[k].copy_to_host())


@pytest.mark.parametrize("augment, cutout, part, in_memory", [("crop-flip", 8, None, True), ("rrc-flip", 0, None, False),
                                                              ("crop-flip", 0, (1, 2), True)])
def test_streamed_batches_are_the_host_batches(tiny_data, augment, cutout, part, in_memory):
    """A split that is not kept on the GPU: the host Loader's batches, bit for bit, through the
    pinned and device rings (more batches than either ring has slots, the last one short)."""
    from ternet.device_data import StreamLoader
    ds = open_dataset(tiny_data)
    kw = dict(shuffle=True, augment=augment, seed=3, in_memory=in_memory, cutout=cutout, drop_last=False,
              output_size=24 if augment == "rrc-flip" else None)
    host, stream = Loader(ds, "train", 24, **kw), StreamLoader(Loader(ds, "train", 24, **kw))
    for epoch, start in ((1, 7), (2, 0)):
        n = 0
        for (hx, hy), (dx, dy) in zip(host.batches(epoch, start=start, part=part),
                                      stream.batches(epoch, start=start, part=part)):
            np.testing.assert_array_equal(dy.copy_to_host(), hy)
            np.testing.assert_array_equal(dx.copy_to_host(), hx)
            n += 1
        assert n == len(host) - start and len(hy) == 16 // (part[1] if part else 1)   # 400 = 16 x 24 + 16


def test_a_split_too_large_for_the_gpu_is_streamed(tiny_data, monkeypatch):
    from ternet import device_data
    from ternet.train import on_gpu
    ld = Loader(open_dataset(tiny_data), "test", 50, shuffle=False, augment="none")
    assert isinstance(on_gpu(ld), device_data.DeviceLoader)
    monkeypatch.setattr(device_data, "fits_on_device", lambda loader, fraction=0.25: False)
    assert isinstance(on_gpu(ld), device_data.StreamLoader)
    monkeypatch.setenv("TERNET_STREAM", "0")                 # the synchronous copy per step instead
    assert on_gpu(ld) is ld
    with pytest.raises(ValueError, match="depth"):
        device_data.StreamLoader(ld, depth=2)


def test_a_stream_stopped_early_starts_over_cleanly(tiny_data):
    """An epoch left after two batches (its generator closed), then a full one: still the host batches."""
    from ternet.device_data import StreamLoader
    ds = open_dataset(tiny_data)
    kw = dict(shuffle=True, augment="crop-flip", seed=5, in_memory=True)
    host, stream = Loader(ds, "train", 40, **kw), StreamLoader(Loader(ds, "train", 40, **kw))
    it = stream.batches(0)
    next(it), next(it)
    it.close()
    for (hx, hy), (dx, dy) in zip(host.batches(1), stream.batches(1)):
        np.testing.assert_array_equal(dx.copy_to_host(), hx)
        np.testing.assert_array_equal(dy.copy_to_host(), hy)
