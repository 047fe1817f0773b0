"""The packer's guarantees: SIGKILL mid-way then rerun gives byte-identical output (acceptance 3),
the same output for any worker count, never trusting a damaged shard, and the selection options.
Run: python -m pytest tests/test_pack.py
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, build_ilsvrc, prep_cli

from ternet.shards import open_dataset


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _prep_args(src, out, *extra):
    return ["imagenet", src, out, "--size", 32, "--shard-size", 10, "-q", *extra]


def test_sigkill_then_rerun_equals_uninterrupted(imagenet_sample, tmp_path):
    src = tmp_path / "src"
    build_ilsvrc(src, imagenet_sample, "folders", copies=2)     # 200 train + 100 val: 30 shards
    r = prep_cli(*_prep_args(src, tmp_path / "whole", "-j", 2))
    assert r.exit_code == 0, r.output
    whole = _files(tmp_path / "whole")
    assert len([n for n in whole if n.endswith(".h5")]) == 30

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ternet", "prep", *map(str, _prep_args(src, out, "-j", 1))]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 60
    while len(list(out.glob("*.h5"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert not (out / "manifest.json").exists() and 3 <= len(kept) < 30, sorted(kept)

    # A damaged file under a final shard name is never taken as valid.
    (out / "val-00009.h5").write_bytes(b"garbage")
    (out / "train-00019.h5").write_bytes(next(iter(whole.values()))[:500])
    r = prep_cli(*_prep_args(src, out, "-j", 2))
    assert r.exit_code == 0, r.output
    assert _files(out) == whole
    for name, mtime in kept.items():     # finished shards were reused, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime, name


def test_same_output_for_any_worker_count(imagenet_sample, tmp_path):
    sample = dict(list(imagenet_sample.items())[:30])
    build_ilsvrc(tmp_path / "src", sample, "folders")
    outs = []
    for j in (1, 2):
        r = prep_cli(*_prep_args(tmp_path / "src", tmp_path / f"j{j}", "-j", j))
        assert r.exit_code == 0, r.output
        outs.append(_files(tmp_path / f"j{j}"))
    assert outs[0] == outs[1]


def test_rerun_with_other_options_replaces_stale_shards(imagenet_sample, tmp_path):
    sample = dict(list(imagenet_sample.items())[:20])
    build_ilsvrc(tmp_path / "src", sample, None)
    out = tmp_path / "out"
    assert prep_cli(*_prep_args(tmp_path / "src", out)).exit_code == 0     # 2 shards of 10
    r = prep_cli("imagenet", tmp_path / "src", out, "--size", 16, "-q")
    assert r.exit_code == 0, r.output
    ds = open_dataset(out)
    assert ds.image_shape == (16, 16, 3) and ds.verify() == []
    assert sorted(p.name for p in out.glob("*.h5")) == ["train-00000.h5"]


def test_refuses_a_folder_of_other_files(imagenet_sample, tmp_path):
    build_ilsvrc(tmp_path / "src", dict(list(imagenet_sample.items())[:2]), None)
    r = prep_cli("imagenet", tmp_path / "src", tmp_path / "src" / "train", "-q")
    assert r.exit_code == 2 and "not ternet shards" in r.output


def test_selection_val_fraction_and_limits(imagenet_sample, tmp_path):
    sample = dict(list(imagenet_sample.items())[:10])
    build_ilsvrc(tmp_path / "src", sample, None, copies=10)    # 10 classes x 10
    out = tmp_path / "out"
    r = prep_cli("imagenet", tmp_path / "src", out, "--size", 8, "--per-class-limit", 8,
                 "--val-fraction", 0.25, "--seed", 3, "-q")
    assert r.exit_code == 0, r.output
    ds = open_dataset(out)
    assert ds.splits == {"train": 60, "val": 20}
    per_class = {k: ds.manifest["splits"][k]["counts_per_class"] for k in ds.splits}
    assert per_class == {"train": [6] * 10, "val": [2] * 10}
    src = {k: {s for i in range(len(ds.shards(k))) for s in ds.read_shard(k, i)["sources"]}
           for k in ds.splits}
    assert not src["train"] & src["val"]
    assert all(int(s.decode().rsplit("_", 1)[1][:-5]) < 8 for s in src["train"] | src["val"])
    r = prep_cli("imagenet", tmp_path / "src", tmp_path / "lim", "--size", 8, "--limit",
                 "train=13", "-q")
    assert r.exit_code == 0 and open_dataset(tmp_path / "lim").splits == {"train": 13}


def test_file_order_is_sorted_and_shuffled_order_is_seeded(imagenet_sample, tmp_path):
    build_ilsvrc(tmp_path / "src", dict(list(imagenet_sample.items())[:12]), None)
    labels = {}
    for name, extra in {"file": ["--order", "file"], "s0": [], "s0b": [],
                        "s1": ["--seed", 1]}.items():
        r = prep_cli("imagenet", tmp_path / "src", tmp_path / name, "--size", 8, "-q", *extra)
        assert r.exit_code == 0, r.output
        labels[name] = open_dataset(tmp_path / name).load_split("train")[1]
    np.testing.assert_array_equal(labels["file"], np.arange(12))
    np.testing.assert_array_equal(labels["s0"], labels["s0b"])
    assert sorted(labels["s0"]) == list(range(12)) and not np.array_equal(labels["s0"], labels["s1"])


@pytest.mark.parametrize("bad, message", [
    (["--limit", "train:5"], "--limit"),
    (["--size", 0], "--size"),
])
def test_bad_options_name_the_option(bad, message, imagenet_sample, tmp_path):
    build_ilsvrc(tmp_path / "src", dict(list(imagenet_sample.items())[:2]), None)
    r = prep_cli("imagenet", tmp_path / "src", tmp_path / "out", *bad)
    assert r.exit_code == 2 and message in r.output
