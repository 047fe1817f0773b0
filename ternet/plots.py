"""Figures drawn with Pillow alone: weight-state histograms over epochs, flip rates, curves.
Exercise: ternet inspect RUN --png out.png."""
import math

from PIL import Image, ImageDraw, ImageFont

W_BAR, W_FLIP, ROW_H, PAD = 520, 300, 130, 12
MARKERS = 100     # points drawn as dots up to this many per line; beyond, the line alone


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
    title = f"{info['run']}  ({info['arch']}): weight states per epoch, and flip rate"
    d.text((PAD, PAD), title, fill="black", font=font)
    lx = max(PAD + W_BAR - 60 * len(cols), PAD + int(d.textlength(title, font=font)) + 20)   # never over the title
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
    gap = 1 if bw >= 3 else 0        # a white line between bars while they are wide enough for one
    for j, r in enumerate(rows):     # (narrower than a pixel: later epochs paint over earlier ones)
        y, left = y0 + h, x0 + j * bw + gap
        right = max(left, x0 + (j + 1) * bw - gap)
        for f, c in zip(r["fractions"], cols):
            d.rectangle([left, y - f * h, right, y], fill=c)
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
        _overlays(d, rows, x0, y0, w, h, max(len(rows) - 1, 1), font)
        return
    lo = math.floor(math.log10(min(v for _, v in pts)))
    hi = max(math.ceil(math.log10(max(v for _, v in pts))), lo + 1)
    n = max(len(rows) - 1, 1)
    xy = [(x0 + w * j / n, y0 + h - h * (math.log10(v) - lo) / (hi - lo)) for j, v in pts]
    if len(xy) > 1:
        d.line(xy, fill=(30, 100, 30), width=2)
    for x, y in xy if len(xy) <= MARKERS else ():
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 100, 30))
    d.text((x0 + 2, y0 + 1), f"1e{hi}", fill="black", font=font)
    d.text((x0 + 2, y0 + h - 12), f"1e{lo}", fill="black", font=font)
    _overlays(d, rows, x0, y0, w, h, n, font)


def _overlays(d, rows, x0, y0, w, h, n, font):
    """Metropolis runs: acceptance rate (linear, 0 at the bottom, 1 at the top) and temperature
    (log, its own range, labelled at the right) over the flip-rate panel."""
    acc = [(j, r["acceptance_rate"]) for j, r in enumerate(rows) if "acceptance_rate" in r]
    if acc:
        xy = [(x0 + w * j / n, y0 + h - h * v) for j, v in acc]
        if len(xy) > 1:
            d.line(xy, fill=(230, 120, 0), width=2)
        for x, y in xy if len(xy) <= MARKERS else ():
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(230, 120, 0))
        d.text((x0 + w - 150, y0 + 1), "acceptance 0..1", fill=(230, 120, 0), font=font)
    temps = [(j, r["temperature"]) for j, r in enumerate(rows) if r.get("temperature", 0) > 0]
    if temps:
        lo, hi = math.log10(min(v for _, v in temps)), math.log10(max(v for _, v in temps))
        hi = max(hi, lo + 1e-9)
        xy = [(x0 + w * j / n, y0 + h - h * (0.1 + 0.8 * (math.log10(v) - lo) / (hi - lo))) for j, v in temps]
        if len(xy) > 1:
            d.line(xy, fill=(120, 40, 160), width=1)
        d.text((x0 + w - 150, y0 + 13), f"T {10 ** lo:.1e}..{10 ** hi:.1e}", fill=(120, 40, 160), font=font)


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def accuracy_curves(series, path, title, keys=("val_acc", "test_acc")):
    """`ternet sweep`'s figure: one panel per key (val, test accuracy per epoch); one line per
    algorithm (the mean over its runs) with a band of ± one standard deviation.
    series: {algorithm: [{key: [value per epoch]}, ...one per run]}."""
    font = ImageFont.load_default()
    pw, ph = 460, 300
    img = Image.new("RGB", (PAD * 3 + pw * len(keys) + 40 * len(keys), ph + 60 + 14 * len(series)), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), title, fill="black", font=font)
    stats = {a: {k: _mean_std_by_epoch([run[k] for run in runs]) for k in keys} for a, runs in series.items()}
    for p, key in enumerate(keys):
        x0, y0 = PAD + 40 + p * (pw + 40 + PAD), PAD + 20
        vals = [v for s in stats.values() for m, sd in s[key] for v in (m - sd, m + sd)]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.02 * (hi - lo + 1e-9), hi + 0.02 * (hi - lo + 1e-9)
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        d.text((x0 + 4, y0 + 2), key.replace("_", " "), fill="black", font=font)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            d.text((x0 - 38, y0 + ph - frac * ph - 6), f"{100 * v:.1f}%", fill="black", font=font)
        n = max(max(len(s[key]) for s in stats.values()) - 1, 1)
        px = lambda j: x0 + pw * j / n
        py = lambda v: y0 + ph - ph * (v - lo) / (hi - lo)
        for c, (algo, s) in enumerate(stats.items()):
            col = PALETTE[c % len(PALETTE)]
            band = [(px(j), py(m + sd)) for j, (m, sd) in enumerate(s[key])] + \
                   [(px(j), py(m - sd)) for j, (m, sd) in reversed(list(enumerate(s[key])))]
            if len(band) > 2:
                d.polygon(band, fill=tuple(int(255 - 0.25 * (255 - v)) for v in col))
        for c, (algo, s) in enumerate(stats.items()):
            col = PALETTE[c % len(PALETTE)]
            xy = [(px(j), py(m)) for j, (m, _) in enumerate(s[key])]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2)
            for x, y in xy:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
        d.text((x0, y0 + ph + 2), "epoch 1", fill="black", font=font)
        d.text((x0 + pw - 50, y0 + ph + 2), f"epoch {n + 1}", fill="black", font=font)
    for c, algo in enumerate(series):
        y = PAD + 20 + ph + 20 + 14 * c
        d.rectangle([PAD + 40, y + 2, PAD + 50, y + 10], fill=PALETTE[c % len(PALETTE)])
        d.text((PAD + 56, y), algo, fill="black", font=font)
    img.save(path)


def _mean_std_by_epoch(runs):
    """[(mean, std)] per epoch over the runs that reached it (None values skipped)."""
    out = []
    for j in range(max((len(r) for r in runs), default=0)):
        v = [r[j] for r in runs if j < len(r) and r[j] is not None]
        if not v:
            break
        m = sum(v) / len(v)
        out.append((m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0))
    return out
