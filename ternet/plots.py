"""Figures drawn with Pillow alone: weight-state histograms over epochs, flip rates, curves.
Exercise: ternet inspect RUN --png out.png."""
import math

from PIL import Image, ImageDraw, ImageFont

W_BAR, W_FLIP, ROW_H, PAD = 520, 300, 130, 12


def _colors(n):
    # negative states blue, zero grey, positive red; deeper for larger magnitudes
    half = n // 2
    out = []
    for k in range(n):
        d = (k - half) / max(half, 1)
        if d < 0:
            out.append((int(60 + 120 * (1 + d)), int(90 + 110 * (1 + d)), 220))
        elif d > 0:
            out.append((220, int(90 + 110 * (1 - d)), int(60 + 120 * (1 - d))))
        else:
            out.append((190, 190, 190))
    return out


def state_figure(info, path):
    """One row per layer: stacked state fractions per epoch (left), flip rate per epoch (right)."""
    layers = info["layers"]
    font = ImageFont.load_default()
    h = PAD * 3 + 20 + ROW_H * len(layers)
    img = Image.new("RGB", (W_BAR + W_FLIP + PAD * 4, h), "white")
    d = ImageDraw.Draw(img)
    cols = _colors(len(info["states"]))
    d.text((PAD, PAD), f"{info['run']}  ({info['arch']}): weight states per epoch, and flip rate", fill="black", font=font)
    lx = PAD + W_BAR - 60 * len(cols)
    for k, (s, c) in enumerate(zip(info["states"], cols)):
        d.rectangle([lx + 60 * k, PAD, lx + 60 * k + 10, PAD + 10], fill=c)
        d.text((lx + 60 * k + 14, PAD), f"{s:+g}" if s else "0", fill="black", font=font)
    for i, (name, rows) in enumerate(layers.items()):
        top = PAD * 2 + 20 + ROW_H * i
        _stacked(d, rows, cols, PAD, top, W_BAR, ROW_H - 30, font, name)
        _flips(d, rows, PAD * 3 + W_BAR, top, W_FLIP, ROW_H - 30, font)
    img.save(path)


def _stacked(d, rows, cols, x0, y0, w, h, font, name):
    d.text((x0, y0), name, fill="black", font=font)
    y0 += 14
    bw = w / max(len(rows), 1)
    for j, r in enumerate(rows):
        y = y0 + h
        for f, c in zip(r["fractions"], cols):
            d.rectangle([x0 + j * bw + 1, y - f * h, x0 + (j + 1) * bw - 1, y], fill=c)
            y -= f * h
    d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
    d.text((x0, y0 + h + 1), f"{rows[0]['epoch']}", fill="black", font=font)
    d.text((x0 + w - 30, y0 + h + 1), f"{rows[-1]['epoch']}", fill="black", font=font)


def _flips(d, rows, x0, y0, w, h, font):
    pts = [(j, r["flip_rate"]) for j, r in enumerate(rows) if r.get("flip_rate")]
    d.text((x0, y0), "flip rate per weight per step (log)", fill="black", font=font)
    y0 += 14
    d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
    if not pts:
        return
    lo = math.floor(math.log10(min(v for _, v in pts)))
    hi = max(math.ceil(math.log10(max(v for _, v in pts))), lo + 1)
    n = max(len(rows) - 1, 1)
    xy = [(x0 + w * j / n, y0 + h - h * (math.log10(v) - lo) / (hi - lo)) for j, v in pts]
    if len(xy) > 1:
        d.line(xy, fill=(30, 100, 30), width=2)
    for x, y in xy:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 100, 30))
    d.text((x0 + 2, y0 + 1), f"1e{hi}", fill="black", font=font)
    d.text((x0 + 2, y0 + h - 12), f"1e{lo}", fill="black", font=font)
