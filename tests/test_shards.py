"""The shard format (ternet/shards.py): round trips, byte-identical output, format/version checks
with hints, and verify() catching damage. Synthetic data only. Run: python -m pytest tests/test_shards.py
"""
import json
import time

import numpy as np
import pytest

from data_prep.decode import resize_array
from data_prep.pack import pack_arrays
from ternet.shards import ShardFormatError, open_dataset


def _random_set(seed=0, n=(23, 9), shape=(6, 5, 3)):
    gen = np.random.default_rng(seed)
    return {s: (gen.integers(0, 256, (k, *shape), dtype=np.uint8), gen.integers(0, 4, k))
            for s, k in zip(("train", "test"), n)}


def test_round_trip_counts_and_stats(tmp_path):
    data = _random_set()
    pack_arrays(tmp_path / "ds", data, ["a", "b", "c", "d"], shard_size=7)
    ds = open_dataset(tmp_path / "ds" / "manifest.json")
    assert ds.splits == {"train": 23, "test": 9} and ds.image_shape == (6, 5, 3)
    assert ds.class_names == ["a", "b", "c", "d"] and ds.num_classes == 4
    assert [c for _, c in ds.shards("train")] == [7, 7, 7, 2]
    for split, (images, labels) in data.items():
        im, lab = ds.load_split(split)
        np.testing.assert_array_equal(im, images)
        np.testing.assert_array_equal(lab, labels)
        assert lab.dtype == np.int32 and im.dtype == np.uint8
        assert ds.manifest["splits"][split]["counts_per_class"] == np.bincount(
            labels, minlength=4).tolist()
    train = data["train"][0].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, train.std(0), rtol=1e-6)
    assert ds.mean.dtype == np.float32 and ds.verify() == []


def test_same_input_gives_byte_identical_files(tmp_path):
    data = _random_set(1)
    for name in ("a", "b"):
        pack_arrays(tmp_path / name, data, list("abcd"), shard_size=10, compress=4)
        time.sleep(1.1)   # HDF5 timestamps have 1 s resolution: none may end up in the files
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name


def test_variable_layout_keeps_aspect_and_load_split_center_crops(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    pack_arrays(tmp_path / "v", {"train": (images, np.arange(5) % 2)}, ["x", "y"], size=10,
                crop=False)
    ds = open_dataset(tmp_path / "v")
    assert ds.layout == "variable" and ds.image_shape == (10, 10, 3)
    sh = ds.read_shard("train", 0)
    assert sh["shapes"].tolist() == [[10, 15, 3]] * 5
    im, _ = ds.load_split("train")
    ref = np.stack([resize_array(a, 10, crop=False)[:, 2:12] for a in images])
    np.testing.assert_array_equal(im, ref)
    assert ds.verify() == []


def test_wrong_format_or_version_fails_with_a_hint(tmp_path):
    pack_arrays(tmp_path / "ds", _random_set(), list("abcd"))
    m = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(m.read_text())
    m.write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ShardFormatError, match=r"manifest.json.*HINT.*ternet prep"):
        open_dataset(tmp_path / "ds")
    with pytest.raises(ShardFormatError, match=r"not a packed dataset.*HINT.*ternet prep"):
        open_dataset(tmp_path / "nowhere")


def test_verify_finds_damage(tmp_path):
    pack_arrays(tmp_path / "ds", _random_set(), list("abcd"), shard_size=10)
    ds = open_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "train-00001.h5"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (tmp_path / "ds" / "test-00000.h5").unlink()
    problems = ds.verify()
    assert len(problems) == 2
    assert "train-00001.h5" in problems[0] and "sha256" in problems[0]
    assert "test-00000.h5: missing" in problems[1]
