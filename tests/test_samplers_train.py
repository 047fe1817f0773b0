"""The new samplers inside the trainer: exact resume (sampler state and per-weight slots through
checkpoints), per-layer acceptance rates and temperatures in metrics.jsonl and `ternet inspect`,
the activation-window annealing, and the `ternet sweep` runner with validation selection."""
import json

import numpy as np
import pytest

from ternet.config import Config
from ternet.run import RunDir
from ternet.train import Trainer, latest_checkpoint

SMALL = "8C5p0-MP2-16C5p0-MP2-32FC"
ADAPTIVE = (("gain", 2.0), ("mix", 0.2), ("t_schedule", "adaptive"), ("target", 0.3), ("target_end", 0.05),
            ("temperature", 1e-4))


@pytest.fixture(scope="session")
def tiny_val_data(tmp_path_factory):
    """400 train / 100 val / 200 test images of the embedded Fashion-MNIST subset."""
    from data_prep.pack import pack_arrays
    from ternet.shards import EMBEDDED_DEFAULT, open_dataset
    src = open_dataset(EMBEDDED_DEFAULT)
    images, labels = src.load_split("train")
    timages, tlabels = src.load_split("test")
    arrays = {"train": (images[:400], labels[:400]), "val": (images[400:500], labels[400:500]),
              "test": (timages[:200], tlabels[:200])}
    out = tmp_path_factory.mktemp("tinyval") / "fmnist-tinyval"
    pack_arrays(out, arrays, src.class_names, name="fmnist-tinyval")
    return out


def make(data, path, **kw):
    base = dict(data=str(data), arch=SMALL, epochs=2, batch_size=50, log_every=3, ckpt_every=5, keep_last=2,
                device="cpu", sampler="dst")
    base.update(kw)
    return Config(**base).resolve(), RunDir(path)


def _weights_and_slots(path):
    import h5py
    with h5py.File(path, "r") as f:
        out = {k: f["weights"][k][()] for k in f["weights"]}
        f["slots"].visititems(lambda n, o: out.__setitem__("slot/" + n, o[()]) if hasattr(o, "shape") else None)
        return out, json.loads(f.attrs["trainer"]).get("sampler")


@pytest.mark.parametrize("sampler,source,extra", [
    ("metropolis", "adam", ADAPTIVE + (("a_end", 0.2),)),
    ("bop", "sgd", (("gamma", 0.1), ("threshold", 0.3))),
])
def test_exact_resume(tiny_val_data, tmp_path, sampler, source, extra):
    """N steps in one go == k steps, crash, resume from the checkpoint, N - k steps: bit for bit."""
    kw = dict(sampler=sampler, source=source, lr=0.02 if source == "adam" else 0.0, extra=extra)
    cfg, run_a = make(tiny_val_data, tmp_path / "a", **kw)
    run_a.create(cfg)
    Trainer(cfg, run_a, progress=False).fit()
    _, run_b = make(tiny_val_data, tmp_path / "b", **kw)
    run_b.create(cfg)
    t = Trainer(cfg, run_b, progress=False)
    real_step, calls = t.train_step, [0]

    def crashing(x, y):
        calls[0] += 1
        if calls[0] == 12:
            raise RuntimeError("crash")
        real_step(x, y)

    t.train_step = crashing
    with pytest.raises(RuntimeError):
        t.fit()
    t2 = Trainer(cfg, run_b, progress=False)
    ck = latest_checkpoint(run_b)
    assert ck["trainer"]["step"] == 10
    t2.restore(ck)
    t2.fit()
    (wa, sa), (wb, sb) = _weights_and_slots(run_a.checkpoints()[-1]), _weights_and_slots(run_b.checkpoints()[-1])
    assert sorted(wa) == sorted(wb) and any(k.startswith("slot/") for k in wa)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert sa == sb
    assert run_a.metrics_path.read_bytes() == run_b.metrics_path.read_bytes()
    if sampler == "metropolis":
        assert len(sa["temperature"]["values"]) == len(t2.tparams) and len(set(sa["temperature"]["values"])) > 1  # per layer


def test_metrics_and_inspect_show_acceptance_and_temperature(tiny_val_data, tmp_path):
    from ternet.inspect import collect, render_text
    cfg, run = make(tiny_val_data, tmp_path / "r", sampler="metropolis", source="adam", lr=0.02,
                    extra=ADAPTIVE + (("a_end", 0.2), ("a_schedule", "cosine")))
    run.create(cfg)
    t = Trainer(cfg, run, progress=False)
    t.fit()
    recs = run.metrics()
    ep = [r for r in recs if r["type"] == "epoch"]
    layer = next(iter(ep[-1]["layers"].values()))
    for key in ("flip_rate", "proposal_rate", "acceptance_rate", "uphill_acceptance", "temperature"):
        assert key in layer, key
    assert 0 <= layer["acceptance_rate"] <= 1 and layer["temperature"] > 0
    steps = [r for r in recs if r["type"] == "step"]
    assert all("temperature" in r and "target" in r for r in steps)
    a = [r["act_a"] for r in steps]
    assert a[0] > a[-1] > 0.2 - 1e-9 and all(x >= y for x, y in zip(a, a[1:]))   # window annealed to a_end
    from ternet.layers import BNAct, TernaryAct
    acts = [l.act if isinstance(l, BNAct) else l for l in t.model.layers() if isinstance(l, (BNAct, TernaryAct))]
    assert acts and all(abs(x.a - a[-1]) < 0.05 for x in acts)
    text = render_text(collect(run.path))
    assert "accept" in text and "uphill acc" in text and " T" in text
    png = tmp_path / "inspect.png"
    from ternet.inspect import inspect_run
    inspect_run(run.path, png=str(png), echo=lambda *_: None)
    assert png.stat().st_size > 1000


def test_sweep_selects_on_val_and_reports(tiny_val_data, tmp_path):
    from click.testing import CliRunner
    from ternet.cli import cli
    from ternet.sweep import collect, load_config, run_result
    conf = tmp_path / "pilot.toml"
    conf.write_text(f'''
name = "tiny"
seeds = [0, 1]
[base]
data = "{tiny_val_data}"
arch = "{SMALL}"
epochs = 2
batch_size = 100
log_every = 2
[algorithms.dst-adam]
sampler = "dst"
source = "adam"
lr = 0.02
[algorithms.bop]
sampler = "bop"
set = {{ threshold = 0.3, gamma = 0.1 }}
''')
    res = CliRunner().invoke(cli, ["sweep", str(conf), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu",
                                   "-j", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    root = tmp_path / "runs" / "tiny"
    for f in ("results.md", "results.json", "curves.png", "sweep.json"):
        assert (root / f).exists(), f
    table = json.loads((root / "results.json").read_text())["table"]
    assert [r["algorithm"] for r in table] == ["dst-adam", "bop"] and all(r["complete"] for r in table)
    for row in table:
        for seed, r in row["runs"].items():
            epochs = [e for e in RunDir(root / f"{row['algorithm']}-s{seed}").metrics() if e["type"] == "epoch"]
            best = max(range(len(epochs)), key=lambda i: (epochs[i]["val_acc"], -i))
            assert r["test_acc"] == epochs[best]["test_acc"] and r["best_epoch"] == best + 1  # test read at best val
    assert json.loads((root / "bop-s1" / "config.json").read_text())["extra"] == {"gamma": 0.1, "threshold": 0.3}
    md = (root / "results.md").read_text()
    assert "| dst-adam |" in md and "±" in md
    again = CliRunner().invoke(cli, ["sweep", str(conf), "--runs-dir", str(tmp_path / "runs")])
    assert again.exit_code == 0 and "start" not in again.output      # finished runs are skipped
    spec = load_config(conf)
    assert collect(spec, root)[0]["seeds"] == [0, 1] and run_result(RunDir(root / "bop-s0"))["wall_s"] > 0


def test_sweep_refuses_data_without_val(tiny_data, tmp_path):
    from click.testing import CliRunner
    from ternet.cli import cli
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"name": "x", "seeds": [0], "base": {"data": str(tiny_data)},
                                "algorithms": {"dst": {"sampler": "dst"}}}))
    res = CliRunner().invoke(cli, ["sweep", str(conf), "--runs-dir", str(tmp_path)])
    assert res.exit_code != 0 and "--val-fraction" in res.output
