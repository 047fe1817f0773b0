"""Shared test fixtures: where the real test data lives, and the compute backends to run on.

CUDA kernels run here under numba's simulator (NUMBA_ENABLE_CUDASIM=1, set below when no GPU
driver is present, before numba is imported) on tiny shapes; tests marked `gpu` need real hardware.
"""
import os
import pathlib
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/proc/driver/nvidia/version"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pytest_collection_modifyitems(config, items):
    if SIMULATOR:
        skip = pytest.mark.skip(reason="needs a real CUDA GPU (running under the simulator)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def shared_data_dir():
    """The folder of real test data: $TERNET_TEST_DATA, else ../shared/data beside the checkout."""
    return pathlib.Path(os.environ.get("TERNET_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real test data not found at {d} (set TERNET_TEST_DATA)")
    return d


@pytest.fixture(scope="session")
def extracted(data_dir, tmp_path_factory):
    """extracted(name) -> folder holding the extracted archive data_dir/name (once per session)."""
    cache = {}

    def get(name):
        if name not in cache:
            src = data_dir / name
            if not src.exists():
                pytest.skip(f"{src} not found")
            out = tmp_path_factory.mktemp(name.split(".")[0])
            with tarfile.open(src) as tf:
                tf.extractall(out, filter="data")
            cache[name] = out
        return cache[name]

    return get


FASHION_MNIST = pathlib.Path(os.environ.get("TERNET_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    if not (FASHION_MNIST / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST IDX files not found in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


def backends():
    return ["cpu", "cuda"]


@pytest.fixture(params=backends())
def backend(request):
    """'cpu', then 'cuda' (the simulator on a machine without a GPU)."""
    if request.param == "cuda":
        from numba import cuda
        if not cuda.is_available():
            pytest.skip("no CUDA device or simulator")
    return request.param


# ----------------------------------------------------------------------------------------------
# data-side fixtures (data_prep, shards, loader): ILSVRC2012-shaped trees built from the 100 real
# ImageNet images in ../shared/data, and small helpers to pack through the real CLI.

@pytest.fixture(scope="session")
def imagenet_sample(extracted):
    """{wnid: path of its one real ImageNet JPEG} (100 classes, every 10th in wnid order)."""
    root = extracted("imagenet-sample-100.tar.gz")
    found = {p.parent.name: p for p in sorted(root.rglob("*.JPEG"))}
    assert len(found) == 100, f"expected 100 sample images under {root}, found {len(found)}"
    return found


def _val_name(i):
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def build_ilsvrc(root, sample, form, copies=1, classes_tsv=None):
    """An ILSVRC2012-shaped tree under root: train/<wnid>/ (symlinks to the sample, `copies` per
    class) and, unless form is None, a flat val/ of the same images in a seeded shuffled order,
    labelled in one of the three forms: "folders", "kaggle" or "devkit". Returns
    {val file name: wnid}."""
    import csv
    import random

    root = pathlib.Path(root)
    for wnid, src in sample.items():
        (root / "train" / wnid).mkdir(parents=True)
        for k in range(copies):
            os.symlink(src, root / "train" / wnid / f"{wnid}_{k}.JPEG")
    if form is None:
        return {}
    wnids = sorted(sample)
    random.Random(3).shuffle(wnids)
    truth = {_val_name(i + 1): w for i, w in enumerate(wnids)}
    for name, w in truth.items():
        folder = root / "val" / (w if form == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(sample[w], folder / name)
    if form == "kaggle":
        rows = sorted(truth.items(), key=lambda kv: kv[1])      # the csv is not in file order
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for name, wnid in rows:
                w.writerow([name[:-5], f"{wnid} 10 20 100 200 {wnid} 5 5 50 50"])
    elif form == "devkit":
        _write_devkit(root / "ILSVRC2012_devkit_t12" / "data", truth, classes_tsv)
    return truth


def _write_devkit(folder, truth, classes_tsv):
    """ground truth + a meta.mat whose ILSVRC2012_IDs are a seeded shuffle of the 1000 wnids (not
    wnid order, as in the real devkit), plus non-leaf synsets with ids above 1000."""
    import numpy as np
    sio = pytest.importorskip("scipy.io", reason="writing the devkit's meta.mat needs scipy")
    lines = [ln.split("\t") for ln in pathlib.Path(classes_tsv).read_text().splitlines() if ln]
    perm = np.random.default_rng(7).permutation(len(lines))
    syn = np.zeros(len(lines) + 3, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                          ("num_children", "O")])
    ids = {}
    for i, (wnid, name) in enumerate(lines):
        ids[wnid] = int(perm[i]) + 1
        syn[i] = (ids[wnid], wnid, name, 0)
    for j in range(3):
        syn[len(lines) + j] = (1001 + j, f"n9999999{j}", "some parent synset", 5)
    folder.mkdir(parents=True)
    sio.savemat(folder / "meta.mat", {"synsets": syn.reshape(-1, 1)})
    (folder / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[truth[n]]}\n" for n in sorted(truth)))


def prep_cli(*args):
    """Run `ternet prep ARGS...` in-process; returns the click Result (assert on exit_code)."""
    from click.testing import CliRunner
    from ternet.cli import cli
    return CliRunner().invoke(cli, ["prep", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="session")
def extracted_subset(data_dir, tmp_path_factory):
    """extracted_subset(name, k) -> folder holding the first k files (in archive order) of every
    folder of archive data_dir/name, plus its top-level files: seconds instead of the ~10 s that
    writing all 60-70 thousand files of the CIFAR-10 or MNIST archives takes."""
    cache = {}

    def get(name, k):
        if (name, k) not in cache:
            src = data_dir / name
            if not src.exists():
                pytest.skip(f"{src} not found")
            out = tmp_path_factory.mktemp(name.split(".")[0] + f"-{k}")
            seen = {}
            with tarfile.open(src) as tf:
                for m in tf:
                    folder = os.path.dirname(m.name)
                    if m.isfile() and seen.setdefault(folder, 0) < k:
                        seen[folder] += 1
                        tf.extract(m, out, filter="data")
            cache[(name, k)] = out
        return cache[(name, k)]

    return get


# ---- trainer fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 400/200-image slice of the embedded Fashion-MNIST subset, packed as a dataset."""
    from data_prep.pack import pack_arrays
    from ternet.shards import EMBEDDED_DEFAULT, open_dataset
    src = open_dataset(EMBEDDED_DEFAULT)
    arrays = {}
    for split, n in (("train", 400), ("test", 200)):
        images, labels = src.load_split(split)
        arrays[split] = (images[:n], labels[:n])
    out = tmp_path_factory.mktemp("tiny") / "fmnist-tiny"
    pack_arrays(out, arrays, src.class_names, name="fmnist-tiny")
    return out
