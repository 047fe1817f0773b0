"""The embedded default dataset (ternet/data/fashion-mnist-small, used by `ternet train` without
--data): present, class-balanced, small, and reproduced exactly by the documented command from
Debian's Fashion-MNIST IDX files. Run: python -m pytest tests/test_embedded.py
"""
import numpy as np
from conftest import ROOT, prep_cli

from data_prep import embedded
from ternet.loader import Loader
from ternet.shards import EMBEDDED_DEFAULT, open_dataset


def test_embedded_default_is_a_small_balanced_dataset():
    ds = open_dataset(EMBEDDED_DEFAULT)
    assert ds.splits == {"train": 10000, "test": 2000} and ds.image_shape == (28, 28, 1)
    assert ds.manifest["splits"]["train"]["counts_per_class"] == [1000] * 10
    assert ds.manifest["splits"]["test"]["counts_per_class"] == [200] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.verify() == []
    size = sum(p.stat().st_size for p in EMBEDDED_DEFAULT.iterdir())
    assert size < 6 << 20, f"{size} bytes: the package ships this, keep it a few MB"
    x, y = next(Loader(ds, "train", 64).batches(0))
    assert x.shape == (64, 28, 28, 1) and y.dtype == np.int32


def test_documented_command_reproduces_the_shipped_shards(fashion_mnist_dir, tmp_path):
    readme = (ROOT / "data_prep" / "README.md").read_text()
    assert embedded.COMMAND in readme, "data_prep/README.md must show the exact build command"
    args = [str(fashion_mnist_dir) if a == embedded.SRC else a for a in embedded.ARGS]
    args[args.index(embedded.OUT)] = str(tmp_path / "rebuilt")
    r = prep_cli(*args, "-q")
    assert r.exit_code == 0, r.output
    shipped, rebuilt = open_dataset(EMBEDDED_DEFAULT), open_dataset(tmp_path / "rebuilt")
    for split in ("train", "test"):
        for a, b in zip(shipped.load_split(split), rebuilt.load_split(split)):
            np.testing.assert_array_equal(a, b)
    for key in ("class_ids", "class_names", "mean", "std", "image_shape"):
        assert shipped.manifest[key] == rebuilt.manifest[key], key
