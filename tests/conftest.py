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
