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


def test_device_parts_make_up_the_batch(tiny_data):
    from ternet.device_data import DeviceLoader
    kw = dict(shuffle=True, augment="crop-flip", seed=3, in_memory=True)
    dev = DeviceLoader(Loader(open_dataset(tiny_data), "train", 8, **kw))
    whole = next(dev.batches(1, start=2))
    parts = [next(dev.batches(1, start=2, part=(i, 2))) for i in range(2)]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([p[k].copy_to_host() for p in parts]), whole[k].copy_to_host())
