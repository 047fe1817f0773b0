"""The other importers on real data from ../shared/data and Debian's Fashion-MNIST, on subsets of
a few hundred images (the full 60k/70k packs are commands in docs/data.md): CIFAR-10 class folders
and the pickle form, MNIST PNG folders, IDX files gzipped or not. Run: python -m pytest tests/test_sources.py
"""
import gzip
import pickle
import tarfile

import numpy as np
import pytest
from conftest import prep_cli
from PIL import Image

from data_prep.idx import FASHION_NAMES
from ternet.loader import Loader
from ternet.shards import open_dataset

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _one_epoch(ds):
    """Every split through the loader once, as a trainer would: train augmented, others eval."""
    for split in ds.splits:
        train = split == "train"
        loader = Loader(ds, split, 32, shuffle=train, augment="auto" if train else "none")
        n = 0
        for x, y in loader.batches(0):
            assert x.shape[1:] == loader.output_shape and np.isfinite(x).all()
            n += len(y)
        assert n == (ds.splits[split] // 32 * 32 if train else ds.splits[split])


def test_cifar10_class_folders(extracted_subset, tmp_path):
    src = extracted_subset("cifar10-jpg.tar.gz", 25)
    r = prep_cli("cifar10", src, tmp_path / "out", "--per-class-limit", "train=20,test=5", "-q")
    assert r.exit_code == 0, r.output
    ds = open_dataset(tmp_path / "out")
    assert ds.class_ids == CIFAR and ds.image_shape == (32, 32, 3)
    assert ds.splits == {"train": 200, "test": 50}
    assert ds.manifest["splits"]["train"]["counts_per_class"] == [20] * 10
    _one_epoch(ds)


def _cifar_pickles(src, folder):
    """A cifar-10-python.tar.gz made from the JPEG folders (10 per class train, 2 test), in the
    official layout: protocol-2 pickles of {b'data': (n, 3072) planar uint8, b'labels': [...]}."""
    def batch(split, k):
        files = [(c, sorted((src / split / name).iterdir())[:k]) for c, name in enumerate(CIFAR)]
        pairs = [(np.asarray(Image.open(f).convert("RGB")), c) for c, fs in files for f in fs]
        return (np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs]))

    train, test = batch("train", 10), batch("test", 2)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def dump(name, images, labels):
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in labels]}, f, protocol=2)
    for i in range(5):
        dump(f"data_batch_{i + 1}", train[0][i::5], train[1][i::5])
    dump("test_batch", *test)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR]}, f, protocol=2)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(d, arcname="cifar-10-batches-py")
    order = np.concatenate([np.arange(i, 100, 5) for i in range(5)])
    return (train[0][order], train[1][order]), test


def test_cifar10_pickle_archive_and_folder(extracted_subset, tmp_path):
    (train, test) = _cifar_pickles(extracted_subset("cifar10-jpg.tar.gz", 25), tmp_path)
    for src in (tmp_path / "cifar-10-python.tar.gz", tmp_path / "cifar-10-batches-py"):
        out = tmp_path / f"out-{src.suffix or 'dir'}"
        r = prep_cli("cifar10", src, out, "-q")
        assert r.exit_code == 0, r.output
        ds = open_dataset(out)
        assert ds.class_names == CIFAR and ds.splits == {"train": 100, "test": 20}
        for split, (images, labels) in (("train", train), ("test", test)):
            im, lab = ds.load_split(split)           # file order, pixels as pickled
            np.testing.assert_array_equal(im, images)
            np.testing.assert_array_equal(lab, labels)


def test_mnist_png_folders(extracted_subset, tmp_path):
    src = extracted_subset("mnist-png.tar.gz", 20)
    r = prep_cli("folder", src, tmp_path / "out", "--channels", 1, "--per-class-limit",
                 "train=15,test=5", "--order", "file", "-q")
    assert r.exit_code == 0, r.output
    ds = open_dataset(tmp_path / "out")
    assert ds.class_ids == [str(i) for i in range(10)] and ds.image_shape == (28, 28, 1)
    assert ds.splits == {"train": 150, "test": 50}
    im, lab = ds.load_split("test")
    first = sorted((src / "test" / "0").iterdir(), key=lambda p: int(p.stem))[0]
    np.testing.assert_array_equal(im[0, :, :, 0], np.asarray(Image.open(first)))
    assert lab[:5].tolist() == [0] * 5
    _one_epoch(ds)


def test_fashion_mnist_idx_gzipped_or_not(fashion_mnist_dir, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (plain / name).write_bytes(gzip.decompress((fashion_mnist_dir / f"{name}.gz").read_bytes()))
    outs = {}
    for key, src in (("gz", fashion_mnist_dir), ("plain", plain)):
        r = prep_cli("mnist", src, tmp_path / f"out-{key}", "--classes", "fashion-mnist",
                     "--per-class-limit", 30, "-q")
        assert r.exit_code == 0, r.output
        outs[key] = open_dataset(tmp_path / f"out-{key}")
    gz, pl = outs["gz"], outs["plain"]
    assert gz.splits == {"train": 300, "test": 300} and pl.splits == {"test": 300}
    assert gz.class_names == FASHION_NAMES and gz.image_shape == (28, 28, 1)
    for a, b in zip(gz.load_split("test"), pl.load_split("test")):
        np.testing.assert_array_equal(a, b)
    _one_epoch(gz)


def test_idx_errors_name_the_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12 + b"x")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"junk")
    r = prep_cli("mnist", tmp_path, tmp_path / "out")
    assert r.exit_code == 2 and "train-" in r.output and "idx" in r.output


@pytest.mark.parametrize("cmd", ["imagenet", "cifar10", "mnist", "folder", "verify"])
def test_every_command_has_help(cmd):
    r = prep_cli(cmd, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output and len(r.output) > 250


def test_idx_val_fraction_carves_from_train(fashion_mnist_dir, tmp_path):
    from click.testing import CliRunner
    from ternet.cli import cli
    from ternet.shards import open_dataset
    out = tmp_path / "fm"
    res = CliRunner().invoke(cli, ["prep", "mnist", str(fashion_mnist_dir), str(out), "--per-class-limit",
                                   "train=50,test=10", "--val-fraction", "0.2", "--quiet"])
    assert res.exit_code == 0, res.output
    ds = open_dataset(out)
    assert ds.splits == {"train": 400, "test": 100, "val": 100}
    train, _ = ds.load_split("train")
    val, yval = ds.load_split("val")
    seen = {bytes(a) for a in train.reshape(len(train), -1)}
    assert not any(bytes(a) in seen for a in val.reshape(len(val), -1))   # disjoint from train
    assert (np.bincount(yval, minlength=10) == 10).all()                  # stratified per class
