"""`ternet export` and `ternet eval --integer` end to end on a tiny trained run.
Run: python -m pytest tests/test_export_cli.py -q
"""
import json
import re

import pytest
from click.testing import CliRunner

from ternet.cli import cli
from ternet.config import Config
from ternet.run import RunDir
from ternet.train import Trainer


def train_tiny(data, folder, arch):
    cfg = Config(data=str(data), arch=arch, sampler="dst", epochs=1, batch_size=50, log_every=4, ckpt_every=0,
                 keep_last=1).resolve()
    run = RunDir(folder)
    run.create(cfg)
    Trainer(cfg, run, progress=False).fit()
    return run.path


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    return train_tiny(tiny_data, tmp_path_factory.mktemp("exp") / "run", "8C5p0-MP2-16C5p0-MP2-32FC")


def test_cutie_sized_run_passes_the_target_check(tiny_data, tmp_path):
    run = train_tiny(tiny_data, tmp_path / "run", "8C3-MP2-16C3-MP2-24C3-MP2")     # 28 -> 14 -> 7 -> 3
    r = invoke("export", run, "--format", "cutie", "--target", "cutie", "--out", tmp_path / "c")
    assert r.exit_code == 0 and "target cutie: 0 finding(s) in 4 layer(s) -- the network fits" in r.output


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_export_cutie_with_target_check(tiny_run, tmp_path):
    r = invoke("export", tiny_run, "--format", "cutie", "--target", "cutie", "--out", tmp_path / "c",
               "--pack", "2bit", "--pack", "5trit", "--name", "tiny")
    assert r.exit_code == 0, r.output
    assert "target cutie: 3 finding(s) in 4 layer(s)" in r.output
    assert "l0 conv1 (5x5/1, 1->8, in 28x28)" in r.output and "[kernel] kernel 5x5 (only 3x3)" in r.output
    assert "fully connected layer over a 4x4 map = kernel 4x4" in r.output
    for f in ("tiny_l0_weights.npy", "tiny_l0_weights_2bit.npy", "tiny_l0_weights_5trit.npy", "tiny_l3_config.json",
              "tiny_l2_thresh_lo.npy", "tiny_graph.json", "tiny_input_lut.npy"):
        assert (tmp_path / "c" / f).exists(), f
    g = json.loads((tmp_path / "c" / "tiny_graph.json").read_text())
    assert len(g["cutie"]["findings"]) == 3


def test_eval_integer_matches_float_on_the_run_and_on_exports(tiny_run, tmp_path):
    r = invoke("eval", tiny_run, "--integer", "--compare")
    assert r.exit_code == 0, r.output
    m = re.search(r"integer accuracy ([0-9.]+) \(200 images.*float accuracy ([0-9.]+); same class 200/200", r.output)
    assert m and m.group(1) == m.group(2), r.output
    assert re.search(r"act1 0/\d+, act2 0/\d+, act3 0/\d+", r.output), r.output
    r = invoke("eval", tiny_run, "--integer", "--compare", "--rounding", "exact")   # exact sums: agree here too
    assert r.exit_code == 0 and "same class 200/200" in r.output, r.output
    for fmt, out in (("npz", tmp_path / "n.npz"), ("h5", tmp_path / "n.h5"), ("cutie", tmp_path / "c")):
        assert invoke("export", tiny_run, "--format", fmt, "--out", out).exit_code == 0
        r2 = invoke("eval", out, "--integer", "--engine", "f32")
        assert r2.exit_code == 0 and f"integer accuracy {m.group(1)} (200 images" in r2.output, r2.output


def test_eval_compare_needs_the_run(tiny_run, tmp_path):
    invoke("export", tiny_run, "--out", tmp_path / "n.npz")
    r = invoke("eval", tmp_path / "n.npz", "--integer", "--compare")
    assert r.exit_code == 2 and "--compare needs a run folder" in r.output
