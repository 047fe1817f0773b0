"""Plain float64 numpy references of every op's forward, and the helpers that compare launchers
with them: central differences for backwards, first-mismatch reports for forwards."""
import numpy as np


def conv2d(x, w, stride, pad):
    """x (N, H, W, C), w (K, KH, KW, C) -> (N, OH, OW, K), float64."""
    n, h, wd, c = x.shape
    k, kh, kw, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, oh, ow, k))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            out += patch @ w[:, i, j, :].astype(np.float64).T
    return out


def batchnorm_train(x, gamma, beta, eps):
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    mu, var = x.mean(0), x.var(0)
    return (gamma * (x - mu) / np.sqrt(var + eps) + beta)


def maxpool(x, k, stride, pad):
    n, h, w, c = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.full((n, oh, ow, c), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride])
    return out


def avgpool(x, k, stride, pad):
    c = x.shape[-1]
    w = np.zeros((c, k, k, c))
    for ch in range(c):
        w[ch, :, :, ch] = 1.0 / (k * k)
    return conv2d(x, w, stride, pad)


def softmax_xent(logits, labels, eps=0.0):
    """Mean cross-entropy against the targets (1 - eps) one-hot + eps / K."""
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    t = np.full(z.shape, eps / z.shape[1])
    t[np.arange(len(labels)), labels] += 1.0 - eps
    return -(t * logp).sum(1).mean()


def sq_hinge(logits, labels):
    t = -np.ones(logits.shape)
    t[np.arange(len(labels)), labels] = 1
    return (np.maximum(0, 1 - t * logits.astype(np.float64)) ** 2).mean()


def central_diff(f, x, h=1e-4):
    """Gradient of the scalar f at x (float64) by central differences, element by element."""
    x = x.astype(np.float64).copy()
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x)
        flat[i] = old - h
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g


def assert_close(got, ref, atol, rtol, what=""):
    """|got - ref| <= atol + rtol |ref| everywhere; otherwise report the first mismatches."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    bad = np.abs(got - ref) > atol + rtol * np.abs(ref)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = "\n".join(f"  at {tuple(i)}: got {got[tuple(i)]:.6g}, want {ref[tuple(i)]:.6g}" for i in idx)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} mismatches\n{rows}")
