"""Robust decoding (data_prep/decode.py) on synthetic images: draft mode and the one-box resize
agree with the plain resize-then-crop, the direct JPEG path gives exactly the pixels of Image.open +
draft + load, odd modes become RGB/L, and `folder` without --size reports images of another size.
Run: python -m pytest tests/test_decode.py
"""
import io
import json

import numpy as np
import pytest
from conftest import prep_cli
from PIL import Image

from data_prep import decode as decode_module
from data_prep.decode import Unreadable, decode


def _photo(w=300, h=200, edges=True):
    """An RGB test picture: gradients, and a disc with sharp edges unless edges=False."""
    y, x = np.mgrid[0:h, 0:w]
    disc = ((x - w / 3) ** 2 + (y - h / 2) ** 2 < (h / 4) ** 2) * (90 if edges else 0)
    return np.stack([x * 200 // w + disc // 2, y * 200 // h + 30, 255 - x * 150 // w - disc],
                    axis=-1).clip(0, 255).astype(np.uint8)


def _encode(a, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _plain(data, size):
    """The reference: decode fully, resize the short side to size, crop the centre."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    im = im.resize((round(w * size / min(w, h)), round(h * size / min(w, h))), Image.BILINEAR)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.int64)


@pytest.mark.parametrize("size", [16, 32, 64, 150])
def test_draft_and_box_resize_match_plain_resize_then_crop(size):
    smooth = _encode(_photo(edges=False), "PNG")
    png, jpg = _encode(_photo(), "PNG"), _encode(_photo(), "JPEG", quality=95)
    assert decode(png, size).shape == (size, size, 3)
    # PNG: no draft. The one-box resize crops at the exact centre, resize-then-crop at a whole
    # pixel of the resized image: on smooth content they differ by rounding only, at sharp
    # edges by up to that sub-pixel shift.
    assert np.abs(decode(smooth, size).astype(int) - _plain(smooth, size)).max() <= 2
    assert np.abs(decode(png, size).astype(int) - _plain(png, size)).mean() < 1.0
    # JPEG: DCT-domain downscaling first; still the same picture.
    assert np.abs(decode(jpg, size).astype(int) - _plain(jpg, size)).mean() < 2.0


def _jpegs():
    """JPEG flavours the direct path must decode exactly as Pillow's own path does."""
    rgb = Image.fromarray(_photo(331, 217))
    exif = Image.Exif()
    exif[0x010F] = "camera"
    variants = {"420": {}, "444": {"subsampling": 0}, "422": {"subsampling": 1},
                "progressive": {"progressive": True}, "restarts": {"restart_marker_rows": 1},
                "exif+icc": {"exif": exif, "icc_profile": b"\0" * 300}, "q40": {"quality": 40}}
    out = {name: _encode(np.asarray(rgb), "JPEG", **kw) for name, kw in variants.items()}
    out["gray"] = _encode(np.asarray(rgb.convert("L")), "JPEG")
    out["portrait"] = _encode(_photo(217, 331), "JPEG")
    return out


@pytest.mark.parametrize("name, data", list(_jpegs().items()))
def test_direct_jpeg_path_equals_pillow_open_draft_load(name, data, monkeypatch):
    assert decode_module._decode_jpeg(data, 64, 3) is not None    # the fast path is taken
    got = {(s, c, ch): decode(data, s, c, ch) for s in (None, 16, 64, 150) for c in (True, False)
           for ch in (3, 1)}
    monkeypatch.setattr(decode_module, "_decode_jpeg", lambda *args: None)   # Image.open's path
    for (s, c, ch), a in got.items():
        np.testing.assert_array_equal(a, decode(data, s, c, ch), err_msg=f"{name} {s} {c} {ch}")


def test_real_jpegs_take_the_direct_path_with_the_same_pixels(imagenet_sample, monkeypatch):
    datas = [p.read_bytes() for p in imagenet_sample.values()]
    got = [decode(d, 64) for d in datas]
    assert all(decode_module._decode_jpeg(d, 64, 3) is not None for d in datas)
    monkeypatch.setattr(decode_module, "_decode_jpeg", lambda *args: None)
    for a, d in zip(got, datas):
        np.testing.assert_array_equal(a, decode(d, 64))


def test_other_files_take_pillows_path():
    cmyk = Image.fromarray(_photo(60, 40)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    for data in (buf.getvalue(), _encode(_photo(60, 40), "PNG")):
        assert decode_module._decode_jpeg(data, 32, 3) is None
        assert decode(data, 32).shape == (32, 32, 3)


def test_broken_jpegs_say_why():
    data = _encode(_photo(), "JPEG", quality=95)
    with pytest.raises(Unreadable, match="truncated"):
        decode(data[:len(data) // 2], 32)
    with pytest.raises(Unreadable, match="truncated"):
        decode(data[:300], 32)          # cut inside the headers
    i = data.index(b"\xff\xda")        # start of scan: wreck the entropy-coded data after it
    with pytest.raises(Unreadable, match="broken"):
        decode(data[:i + 200] + b"\xff\xff\xff" + data[i + 203:], 32)


def test_short_side_mode_keeps_the_aspect_ratio():
    a = decode(_encode(_photo(300, 200), "JPEG"), 64, crop=False)
    assert a.shape == (64, 96, 3)
    assert decode(_encode(_photo(200, 300), "PNG"), 50, crop=False).shape == (75, 50, 3)


def test_modes_become_rgb_or_gray():
    gray16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG")
    a = decode(buf.getvalue(), channels=1)
    assert a.shape == (30, 40, 1) and a.max() > 200 and a.min() == 0 and a.mean() < 200  # scaled, not clipped
    pal = Image.fromarray(_photo(40, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    assert decode(buf.getvalue()).shape == (30, 40, 3)
    assert decode(_encode(_photo(40, 30), "JPEG"), channels=1).shape == (30, 40, 1)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"), (_encode(_photo(), "PNG")[:200], "cannot"), (b"hello", "not an image")])
def test_unreadable_inputs_say_why(data, reason):
    with pytest.raises(Unreadable, match=reason):
        decode(data, 32)


def test_folder_without_size_reports_images_of_another_size(tmp_path):
    for cls, k in (("a", 3), ("b", 2)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(k):
            Image.fromarray(_photo(12, 10)).save(tmp_path / "src" / cls / f"{i}.png")
    Image.fromarray(_photo(14, 10)).save(tmp_path / "src" / "b" / "odd.png")
    r = prep_cli("folder", tmp_path / "src", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["source"], "--size" in s["reason"]) for s in report["skipped"]] == [("b/odd.png", True)]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["image_shape"] == [10, 12, 3] and manifest["splits"]["train"]["count"] == 5
