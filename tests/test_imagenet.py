"""`ternet prep imagenet` on ILSVRC2012-shaped trees built from the 100 real ImageNet images:
labels in wnid order for each of the three val label forms (acceptance 1), and odd or broken
files (acceptance 2). Run: python -m pytest tests/test_imagenet.py
"""
import io
import json

import numpy as np
import pytest
from conftest import build_ilsvrc, prep_cli
from PIL import Image

from ternet.shards import open_dataset


def _by_source(ds, split):
    """{source key: (image, label)} of a packed split."""
    out = {}
    for i in range(len(ds.shards(split))):
        sh = ds.read_shard(split, i)
        for s, im, lab in zip(sh["sources"], sh["images"], sh["labels"]):
            out[s.decode()] = (im, int(lab))
    return out


@pytest.mark.parametrize("form", ["folders", "kaggle", "devkit"])
def test_val_labels_follow_sorted_wnids(form, imagenet_sample, data_dir, tmp_path):
    truth = build_ilsvrc(tmp_path / "src", imagenet_sample, form,
                         classes_tsv=data_dir / "imagenet-classes.tsv")
    r = prep_cli("imagenet", tmp_path / "src", tmp_path / "out", "--size", 32, "-j", 2, "-q")
    assert r.exit_code == 0, r.output
    ds = open_dataset(tmp_path / "out")
    assert ds.class_ids == sorted(imagenet_sample)
    assert ds.splits == {"train": 100, "val": 100}
    train, val = _by_source(ds, "train"), _by_source(ds, "val")
    for key, (im, label) in val.items():
        name = key.rsplit("/", 1)[-1]
        assert ds.class_ids[label] == truth[name], key
        # The same file sits in train/<wnid>/: equal pixels prove the label is bound to its image.
        t_im, t_label = train[f"train/{truth[name]}/{truth[name]}_0.JPEG"]
        assert t_label == label
        np.testing.assert_array_equal(im, t_im)
    if form == "devkit":        # names come from meta.mat
        names = dict(ln.split("\t") for ln in (data_dir / "imagenet-classes.tsv").read_text()
                     .splitlines() if ln)
        assert ds.class_names == [names[w] for w in ds.class_ids]
        assert ds.manifest["val_labels_from"] == "ILSVRC2012_validation_ground_truth.txt"


def test_flat_val_without_labels_is_a_clear_error(imagenet_sample, tmp_path):
    build_ilsvrc(tmp_path / "src", imagenet_sample, "kaggle")
    (tmp_path / "src" / "LOC_val_solution.csv").unlink()
    r = prep_cli("imagenet", tmp_path / "src", tmp_path / "out", "-q")
    assert r.exit_code == 2
    assert "LOC_val_solution.csv" in r.output and "--val-labels" in r.output


def _salt(folder, sample_jpeg):
    """Odd inputs under a .JPEG name: -> {name: expected reason fragment, or None if valid}."""
    data = sample_jpeg.read_bytes()
    rgb = Image.open(sample_jpeg).convert("RGB")
    (folder / "truncated.JPEG").write_bytes(data[:len(data) // 2])
    (folder / "zero.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image\n")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    (folder / "png.JPEG").write_bytes(buf.getvalue())
    rgb.convert("CMYK").save(folder / "cmyk.JPEG", format="JPEG", quality=95)
    rgb.convert("L").save(folder / "gray.JPEG", format="JPEG", quality=95)
    return {"truncated.JPEG": "truncated", "zero.JPEG": "empty", "text.JPEG": "not an image"}


def test_odd_and_broken_files(imagenet_sample, tmp_path):
    sample = dict(list(imagenet_sample.items())[:4])
    build_ilsvrc(tmp_path / "src", sample, None)
    wnid = sorted(sample)[1]
    folder = tmp_path / "src" / "train" / wnid
    broken = _salt(folder, sample[wnid])
    r = prep_cli("imagenet", tmp_path / "src", tmp_path / "out", "--size", 48, "-j", 2, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    listed = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert set(listed) == set(broken)
    for name, fragment in broken.items():
        assert fragment in listed[name], (name, listed[name])
    ds = open_dataset(tmp_path / "out")
    assert ds.image_shape == (48, 48, 3) and ds.splits["train"] == 4 + 3
    got = _by_source(ds, "train")
    ref = got[f"train/{wnid}/{wnid}_0.JPEG"][0].astype(int)
    for name in ("png.JPEG", "cmyk.JPEG", "gray.JPEG"):
        im, label = got[f"train/{wnid}/{name}"]
        assert im.shape == (48, 48, 3) and ds.class_ids[label] == wnid
        if name == "gray.JPEG":
            assert (im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all()
        else:   # the same picture as the original JPEG (PNG lossless; CMYK re-encoded at q95)
            assert np.abs(im.astype(int) - ref).mean() < 6, name
