"""`ternet prep verify` and the CLI's error messages for bad input. Run: python -m pytest tests/test_cli.py
"""
import numpy as np
from conftest import prep_cli

from data_prep.pack import pack_arrays


def test_verify_ok_then_damaged(tmp_path):
    gen = np.random.default_rng(0)
    pack_arrays(tmp_path / "ds", {"train": (gen.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8),
                                            np.arange(12) % 3)}, list("abc"), shard_size=5)
    r = prep_cli("verify", tmp_path / "ds")
    assert r.exit_code == 0 and "OK (3 shards" in r.output
    shard = tmp_path / "ds" / "train-00002.h5"
    shard.write_bytes(shard.read_bytes()[:-10])
    r = prep_cli("verify", tmp_path / "ds")
    assert r.exit_code == 1 and "train-00002.h5" in r.output and "re-run" in r.output


def test_verify_on_a_folder_without_manifest(tmp_path):
    r = prep_cli("verify", tmp_path)
    assert r.exit_code == 1 and "no manifest.json" in r.output and "HINT" in r.output


def test_folder_errors_say_what_layout_is_expected(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loose.png").write_bytes(b"")
    r = prep_cli("folder", tmp_path / "src", tmp_path / "out")
    assert r.exit_code == 2 and "no class subfolders" in r.output
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "val" / "dog").mkdir(parents=True)
    (tmp_path / "src" / "train" / "cat" / "a.png").write_bytes(b"")
    r = prep_cli("folder", tmp_path / "src", tmp_path / "out")
    assert r.exit_code == 2 and "'dog' is not among the training classes" in r.output
