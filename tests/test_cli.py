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


SMALL = "8C5p0-MP2-16C5p0-MP2-32FC"


def train_cli(*args):
    from click.testing import CliRunner
    from ternet.cli import cli
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


def test_crop_pad_errors_name_the_option_and_the_fix(tiny_data, tmp_path):
    base = ("--data", tiny_data, "--arch", SMALL, "--runs-dir", tmp_path, "--device", "cpu", "--quiet")
    r = train_cli(*base, "--augment", "crop", "--crop-pad", -1)
    assert r.exit_code == 2 and "--crop-pad must be >= 0" in r.output
    for augment in ("none", "rrc-flip"):
        r = train_cli(*base, "--augment", augment, "--crop-pad", 2)
        assert r.exit_code == 2 and f"--augment {augment} makes none" in r.output and "--augment crop" in r.output
    r = train_cli(*base, "--crop-pad", 2)       # auto on grayscale images: no augmentation
    assert r.exit_code == 2 and "--augment auto means none" in r.output and "--augment crop" in r.output
    assert not any(tmp_path.iterdir())          # no run folder was started
    help_ = train_cli("--help").output
    assert "--crop-pad" in help_ and "round(H/8)" in help_


def test_crop_pad_reaches_the_loader_and_old_runs_resume_with_the_automatic_pad(tiny_data, tmp_path):
    import json

    from ternet.config import Config
    from ternet.run import RunDir
    from ternet.train import Trainer
    cfg = Config(data=str(tiny_data), arch=SMALL, augment="crop", crop_pad=2, device="cpu").resolve()
    assert Trainer(cfg, RunDir(tmp_path / "unused"), progress=False).train_loader.pad == 2
    # a run whose config.json predates --crop-pad: resumes as crop_pad=0, bit-identical metrics
    r = train_cli("--data", tiny_data, "--arch", SMALL, "--augment", "crop", "--epochs", 2, "--batch-size", 50,
                  "--device", "cpu", "--quiet", "--runs-dir", tmp_path, "--name", "old")
    assert r.exit_code == 0, r.output
    run = RunDir(tmp_path / "old")
    whole = run.metrics_path.read_bytes()
    conf = json.loads(run.config_path.read_text())
    assert conf.pop("crop_pad") == 0
    run.config_path.write_text(json.dumps(conf))
    run.checkpoints()[-1].unlink()              # back to the end of epoch 1
    r = train_cli("--resume", run.path, "--quiet", "--crop-pad", 2)
    assert r.exit_code == 2 and "conflicts with the run's crop_pad=0" in r.output
    r = train_cli("--resume", run.path, "--quiet")
    assert r.exit_code == 0 and "at epoch 2" in r.output, r.output
    assert run.metrics_path.read_bytes() == whole


def test_label_smoothing_trains_and_is_checked(tiny_data, tmp_path):
    import json
    base = ("--data", tiny_data, "--arch", SMALL, "--runs-dir", tmp_path, "--device", "cpu", "--quiet",
            "--epochs", 1, "--batch-size", 50)
    r = train_cli(*base, "--label-smoothing", 1.0)
    assert r.exit_code == 2 and "--label-smoothing must be in [0, 1)" in r.output
    r = train_cli(*base, "--label-smoothing", 0.1, "--loss", "sqhinge")
    assert r.exit_code == 2 and "Use --loss xent or leave --label-smoothing out" in r.output
    assert not any(tmp_path.iterdir())
    for name, eps in (("plain", 0.0), ("smoothed", 0.1)):
        r = train_cli(*base, "--label-smoothing", eps, "--name", name)
        assert r.exit_code == 0, r.output
    read = lambda n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "smoothed" / "config.json").read_text())["label_smoothing"] == 0.1
    plain, smoothed = read("plain"), read("smoothed")
    first = lambda recs: next(r for r in recs if r["type"] == "step")["loss"]
    assert first(smoothed) != first(plain)           # the training loss is the smoothed one
    assert "Label smoothing" in train_cli("--help").output


def test_cutout_option_trains_and_rejects_a_negative_side(tiny_data, tmp_path):
    import json
    base = ("--data", tiny_data, "--arch", SMALL, "--runs-dir", tmp_path, "--device", "cpu", "--quiet")
    r = train_cli(*base, "--cutout", -1)
    assert r.exit_code == 2 and "--cutout must be >= 0" in r.output
    assert not any(tmp_path.iterdir())
    r = train_cli(*base, "--cutout", 8, "--epochs", 1, "--batch-size", 50, "--name", "c")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["cutout"] == 8
    assert "Cutout" in train_cli("--help").output


def test_average_last_option_prints_and_writes_the_average(tiny_data, tmp_path):
    base = ("--data", tiny_data, "--arch", SMALL, "--runs-dir", tmp_path, "--device", "cpu", "--quiet",
            "--epochs", 2, "--batch-size", 50, "--ckpt-every", 0)
    r = train_cli(*base, "--average-last", 4, "--keep-last", 4)
    assert r.exit_code == 2 and "one an epoch, 2 in all" in r.output
    r = train_cli(*base, "--average-last", 2, "--keep-last", 1)
    assert r.exit_code == 2 and "keeps --keep-last 1" in r.output and "e.g. --keep-last 2" in r.output
    assert not any(tmp_path.iterdir())
    r = train_cli(*base, "--average-last", 2, "--keep-last", 2, "--name", "a")
    assert r.exit_code == 0, r.output
    acc = r.output.split("average of the last 2 checkpoints: test accuracy ")[1].split(";")[0]
    from ternet.inspect import collect
    assert f"{collect(tmp_path / 'a')['average']['test_acc']:.4f}" == acc
    assert (tmp_path / "a" / "average-last2.h5").exists()
    assert "--average-last" in train_cli("--help").output


def test_save_memory_option_trains_and_is_recorded(tiny_data, tmp_path):
    import json
    base = ("--data", tiny_data, "--runs-dir", tmp_path, "--device", "cpu", "--quiet", "--epochs", 1,
            "--batch-size", 50, "--save-memory")
    r = train_cli(*base, "maybe")
    assert r.exit_code == 2 and "--save-memory" in r.output
    assert not any(tmp_path.iterdir())
    for arch, name in ((SMALL, "pooled-first"), ("8C3-16C3-MP2-32FC", "direct")):   # on the CPU: no effect
        r = train_cli(*base, "on", "--arch", arch, "--name", name)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / name / "config.json").read_text())["save_memory"] == "on"
    assert "--save-memory" in train_cli("--help").output
