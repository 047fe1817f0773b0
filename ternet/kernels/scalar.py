"""Scalar math shared by the CPU code and the CUDA kernels, written once so the two cannot drift.

Every function here is a plain @numba.njit function: the CPU kernels call it directly and the
CUDA kernels call it from inside @cuda.jit code. Tested in tests/test_scalar.py and, through the
kernels, in tests/test_ops.py, tests/test_dst.py and tests/test_samplers*.py.
"""
import math

import numba
import numpy as np

U64 = np.uint64
F32 = np.float32
TANH_BOUND = F32(1.0001)      # float32 tanh(y) <= y * TANH_BOUND for y >= 0 (see dst_target)

# ----------------------------------------------------------------------------------------------
# counter-based random numbers (SplitMix64)
#
# A draw is a pure function of (key, index): uniform(key, i). Keys are derived on the host from
# (seed, stream, step), so there is no per-weight generator state to store, a resumed run draws
# exactly what an uninterrupted one would, and the CPU and CUDA paths (and every replica of a
# data-parallel run) make identical draws for identical (key, index).

@numba.njit(inline="always")
def splitmix64(z):
    """One SplitMix64 output for the uint64 counter z (Steele, Lea & Flood, 2014)."""
    z = z + U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


@numba.njit(inline="always")
def uniform(key, i):
    """A float32 in [0, 1) for stream key `key` (uint64) and element index `i`; 24 random bits."""
    z = splitmix64(key ^ splitmix64(U64(i)))
    return F32(z >> U64(40)) * F32(1.0 / 16777216.0)


# ----------------------------------------------------------------------------------------------
# ternary activation and its surrogate derivative

WINDOW_RECT = 0
WINDOW_TRI = 1


@numba.njit(inline="always")
def ternarize(x, r):
    """phi_r(x) = +1 if x > r, -1 if x < -r, else 0."""
    if x > r:
        return 1
    if x < -r:
        return -1
    return 0


@numba.njit(inline="always")
def window_grad(x, r, a, shape):
    """Surrogate d phi_r / dx on the window r-a <= |x| <= r+a (zero outside).

    Rectangular (shape 0): 1/(2a). Triangular (shape 1): (1/a) * (1 - | |x| - r | / a), the
    triangle of the same support and the same unit area.
    """
    d = abs(abs(x) - r)
    if d > a:
        return F32(0.0)
    if shape == WINDOW_RECT:
        return F32(0.5) / a
    return (F32(1.0) - d / a) / a


# ----------------------------------------------------------------------------------------------
# discrete state transition (GXNOR, Deng et al. 2018, eq. 10-13)

@numba.njit(inline="always")
def dst_target(q, dw, qmax, m, u):
    """New state of one weight under the discrete state transition.

    The weight's value is w = q / qmax on the grid Z_N (qmax = 2^(N-1), spacing dz = 1/qmax).
    rho = dw clipped so that w + rho stays in [-1, 1]; in units of dz, s = rho * qmax splits into
    kappa = trunc(s) whole states and a remainder nu = s - kappa; the weight moves kappa states
    and one more in the direction of rho with probability tanh(m * |nu|). u is a uniform draw.
    """
    w = F32(q) / F32(qmax)
    rho = min(max(dw, F32(-1.0) - w), F32(1.0) - w)
    s = rho * F32(qmax)
    kappa = math.trunc(s)
    nu = s - kappa
    step = int(kappa)
    y = m * abs(nu)
    # tanh(y) <= y for y >= 0; a float32 tanh may round an ulp or two above y (glibc's does near
    # 3e-8), never above y * TANH_BOUND: when u reaches that bound the draw cannot win, and the
    # tanh (most of this function's cost) is skipped. Same decisions (tests/test_scalar.py).
    if u < y * TANH_BOUND and u < math.tanh(y):
        step += 1 if s > 0 else -1
    nq = q + step
    return min(max(nq, -qmax), qmax)


@numba.njit(inline="always")
def dst_may_move(q, dw, qmax, m, u):
    """False only where dst_target(q, dw, qmax, m, u) certainly returns q (q on Z_N): no whole
    step (|s| < 1, so kappa = 0 and nu = s) and a draw that cannot win (u >= m |s| TANH_BOUND).
    No tanh and no branch, so a loop of it vectorises: the CPU kernel screens a layer with it
    and runs dst_target only on the few weights that pass (same moves, same draws)."""
    w = F32(q) / F32(qmax)
    rho = min(max(dw, F32(-1.0) - w), F32(1.0) - w)
    s = rho * F32(qmax)
    return (abs(s) >= F32(1.0)) | (u < m * abs(s) * TANH_BOUND)


@numba.njit(inline="always")
def sgd_dw(g, q, lr, decay, qmax):
    """DST's plain step for one weight: dW = -lr g - decay w, w = q / qmax (decay: the step's
    pull toward state 0, lr(t) times the weight-decay factor). Rounded once, via affine(), so
    the CPU and the GPU agree; with decay 0 it is float32(-lr g), the same bits as before."""
    return affine(g, -lr, -decay * (F32(q) / F32(qmax)))


@numba.njit(inline="always")
def rms_lr(lr, ss, n):
    """The learning rate of a step normalised by the gradient's root mean square: lr / rms(g)
    with rms = sqrt(ss / n) from the sum of squares ss (float64) of n gradients, rounded once to
    float32; 0 for an all-zero gradient (no step). sqrt and / are correctly rounded in float64 on
    both paths, so the CPU and the CUDA kernels get the same float32 from the same ss."""
    if ss <= 0.0:
        return F32(0.0)
    return F32(lr / math.sqrt(ss / n))


@numba.njit(inline="always")
def dst_prob(q, dw, qmax, m):
    """Probability that dst_target() takes the extra step (for tests and for Hastings ratios)."""
    w = F32(q) / F32(qmax)
    rho = min(max(dw, F32(-1.0) - w), F32(1.0) - w)
    s = rho * F32(qmax)
    return math.tanh(m * abs(s - math.trunc(s)))


# ----------------------------------------------------------------------------------------------
# batch-norm arithmetic
#
# NVVM contracts a float multiply followed by an add into one FMA by default (one rounding
# instead of two); numba's CPU target does not. An affine step computed in float32 would then
# differ by an ulp between the paths, enough to flip a ternary output sitting on the threshold.
# affine() does it in float64 instead: a product of two float32 values is exact in float64, so
# FMA or not the result rounds the same way, and both paths give the same bits.

@numba.njit(inline="always")
def affine(x, scale, shift):
    """float32(x * scale + shift), identical on the CPU and the GPU (x, scale, shift float32)."""
    return F32(np.float64(x) * np.float64(scale) + np.float64(shift))


@numba.njit(inline="always")
def normalize(x, mean, invstd):
    """xhat = (x - mean) * invstd in float32 (no multiply-add, so nothing to contract)."""
    return (x - mean) * invstd


@numba.njit(inline="always")
def ema(run, new, momentum):
    """run + momentum * (new - run), the running-statistics update, in float32 (via affine)."""
    return affine(new - run, momentum, run)


@numba.njit(inline="always")
def bf16_bits(u):
    """The bf16 bits (uint16) of the float32 whose bits are u (uint32): round to nearest even,
    NaN kept quiet; what conv_mma.cu's to_bf16 stores, so a kernel that writes a gradient can
    also write the bf16 copy the tensor-core convolutions read (kernels.conv_tc.adopt_bf16)."""
    u = np.int64(u)
    r = u | 0x00400000 if (u & 0x7FFFFFFF) > 0x7F800000 else u + 0x7FFF + ((u >> 16) & 1)
    return np.uint16((r >> 16) & 0xFFFF)


@numba.njit(inline="always")
def shifted_moments(k, s1, s2, m):
    """(mean, sum of squared deviations) of m values x from their sums about a shift k (float64):
    s1 = sum(x - k), s2 = sum((x - k)^2); one pass over the data instead of two. With k one of the
    values (batch norm takes each channel's first), the cancellation in s2 - s1^2/m costs about
    (mean - k)^2 / var units of float64 rounding: far below float32's for any k within 10^4
    standard deviations of the mean."""
    d = s1 / m
    return k + d, max(s2 - s1 * d, 0.0)


@numba.njit(inline="always")
def int_shifted_sums(t1, t2, k, m, scale):
    """shifted_moments' (s1, s2) about k from the exact sums t1 = sum(a), t2 = sum(a^2) (int64) of
    m integers a with x = a * scale, scale a power of two and k one of the x: the integers shifted
    by k / scale, then scaled back, every step exact while 4 m max|a|^2 <= 2^53 (the caller's
    bound). Equal to the float64 sums of x - k and (x - k)^2 in any order, which are exact too
    under that bound: the same statistics as a pass over x (batch norm after an integer
    convolution: conv_tc.ConvSums)."""
    ki = np.int64(k / scale)
    mi = np.int64(m)
    u1 = t1 - mi * ki
    u2 = t2 - 2 * ki * t1 + mi * ki * ki
    return np.float64(u1) * scale, np.float64(u2) * (scale * scale)


@numba.njit(inline="always")
def bn_stats(mean, sqdev, m, eps):
    """One channel's batch statistics from its float64 mean and sum of squared deviations over
    m (float64) elements: (mean, invstd, unbiased variance), all float32. The batch variance
    (in invstd) is biased; the running variance gets the unbiased one (as PyTorch), by ema()."""
    var = sqdev / m
    mean32 = F32(mean)
    unbiased = F32(var * m / max(m - 1.0, 1.0))
    invstd = F32(1.0 / math.sqrt(var + eps))
    return mean32, invstd, unbiased


@numba.njit(inline="always")
def bn_eval_coeffs(gamma, beta, run_mean, run_var, eps):
    """(scale, shift) with BN_eval(x) = affine(x, scale, shift), from the running statistics."""
    scale = F32(gamma / math.sqrt(np.float64(run_var) + eps))
    return scale, affine(run_mean, -scale, beta)


@numba.njit(inline="always")
def bn_dx(dy, xhat, gamma, invstd, sdy, sdyx, m):
    """Batch norm's input gradient at one element: gamma * invstd * (dy - (sdy + xhat*sdyx) / m),
    sdy = sum(dy), sdyx = sum(dy * xhat) over the channel (float32), m float64."""
    return F32(gamma * invstd * (dy - affine(xhat, sdyx, sdy) / m))


# ----------------------------------------------------------------------------------------------
# losses (per logit; the loops over a row live in kernels/loss.py, once per path)

@numba.njit(inline="always")
def xent_dlogit(z, mx, s, target, inv_n):
    """d(mean softmax cross-entropy)/d z for one logit z of a row with maximum mx and
    s = sum(exp(z_j - mx)) (float64); target: z's class probability in the target distribution
    (1 or 0 for a one-hot label; xent_target with label smoothing); inv_n = 1/N (float32)."""
    p = math.exp(z - mx) / s
    return F32((p - target) * inv_n)


@numba.njit(inline="always")
def xent_target(is_label, eps, k):
    """Target probability of one of k classes with label smoothing eps: (1 - eps) one-hot + eps / k
    (exactly 1.0 and 0.0 for eps = 0)."""
    return (1.0 - eps + eps / k) if is_label else eps / k


@numba.njit(inline="always")
def xent_row_loss(log_s, zy_mx, sum_z_mx, eps, k):
    """-sum_j t_j log p_j for a row: log s - (1 - eps)(z_y - mx) - (eps / k) sum_j (z_j - mx), float64
    (for eps = 0 the same bits as log s - (z_y - mx))."""
    return log_s - (1.0 - eps) * zy_mx - (eps / k) * sum_z_mx


@numba.njit(inline="always")
def sqhinge(z, is_label, k, scale):
    """Squared hinge at one logit z of a row of k: (loss term max(0, 1 - t z)^2 / k as float64,
    dlogit = -t * max(0, 1 - t z) * scale as float32), t = +1 for the label and -1 otherwise;
    scale = 2 / (N k) makes dlogit the gradient of the mean over samples and classes."""
    t = 1.0 if is_label else -1.0
    mgn = max(0.0, 1.0 - t * z)
    return mgn * mgn / k, F32(-t * mgn * scale)

# Adam step (the DST 'adam' source and the Metropolis proposal drift share it)

@numba.njit(inline="always")
def adam_moments(g, mo, ve, b1, b2):
    """The moments after one more gradient: (b1 mo + (1 - b1) g, b2 ve + (1 - b2) g^2)."""
    return b1 * mo + (1 - b1) * g, b2 * ve + (1 - b2) * g * g


@numba.njit(inline="always")
def adam_dw(mo, ve, lr, c1, c2, eps):
    """The Adam step -lr (mo / c1) / (sqrt(ve / c2) + eps) (c1, c2: bias corrections)."""
    return -lr * (mo / c1) / (math.sqrt(ve / c2) + eps)


@numba.njit(inline="always")
def drift(g, mo, ve, adam, lr, b1, b2, c1, c2, eps):
    """The proposal step dW for gradient g: -lr g (adam=0), or the Adam step that g would make
    from the previous moments (mo, ve) (adam=1). Used for the forward and the reverse proposal."""
    if adam == 0:
        return -lr * g
    m1, v1 = adam_moments(g, mo, ve, b1, b2)
    return adam_dw(m1, v1, lr, c1, c2, eps)


# ----------------------------------------------------------------------------------------------
# Metropolis-Hastings transitions (ternet.samplers.Metropolis; docs/samplers.md)
#
# Proposal Q = (1 - eps) K + eps Nb: with probability eps a symmetric move to a neighbouring
# state (Nb: one state down or up, 1/2 each; a move off the grid proposes staying), otherwise K,
# which is the DST transition with step dW (dst_on=1) or staying put (dst_on=0, the pure
# neighbour proposal with proposal rate eps). The energy change of a move by dv in value is
# estimated from the minibatch gradient g and a diagonal curvature h: dE = g dv + h dv^2 / 2.

@numba.njit(inline="always")
def dst_kernel_prob(q, y, dw, qmax, m):
    """Probability that dst_target(q, dw, qmax, m, u) lands on state y, u uniform."""
    w = F32(q) / F32(qmax)
    rho = min(max(dw, F32(-1.0) - w), F32(1.0) - w)
    s = rho * F32(qmax)
    kappa = math.trunc(s)
    tau = math.tanh(m * abs(s - kappa))
    base = min(max(q + int(kappa), -qmax), qmax)
    extra = min(max(base + (1 if s > 0 else -1), -qmax), qmax)
    p = F32(0.0)
    if y == base:
        p += F32(1.0) - tau
    if y == extra:
        p += tau
    return p


@numba.njit(inline="always")
def neighbour_target(q, qmax, u):
    """Symmetric neighbour move: q - 1 if u < 1/2, else q + 1; a move off Z_N stays at q."""
    y = q - 1 if u < F32(0.5) else q + 1
    if y < -qmax or y > qmax:
        return q
    return y


@numba.njit(inline="always")
def mh_propose(q, dw, qmax, m, eps, dst_on, u_mix, u_prop):
    """A state drawn from Q(q -> .) with the uniforms u_mix (which component) and u_prop."""
    if u_mix < eps:
        return neighbour_target(q, qmax, u_prop)
    if dst_on != 0:
        return dst_target(q, dw, qmax, m, u_prop)
    return q


@numba.njit(inline="always")
def mh_proposal_prob(q, y, dw, qmax, m, eps, dst_on):
    """Q(q -> y) for y != q: eps [|y - q| = 1] / 2 + (1 - eps) P_DST(q -> y; dW) [dst_on]."""
    p = eps * F32(0.5) if abs(y - q) == 1 else F32(0.0)
    if dst_on != 0:
        p += (F32(1.0) - eps) * dst_kernel_prob(q, y, dw, qmax, m)
    return p


@numba.njit(inline="always")
def energy_delta(g, h, dv):
    """Estimated energy change of moving a weight's value by dv: g dv + h dv^2 / 2."""
    return g * dv + F32(0.5) * h * dv * dv


@numba.njit(inline="always")
def mh_accept_prob(de, temp, ratio):
    """Metropolis-Hastings acceptance min(1, exp(-dE / T) ratio), ratio = Q(y -> x) / Q(x -> y).

    T <= 0 is the greedy limit: a move that lowers the energy is always accepted, one that raises
    it never, and one that leaves it unchanged with probability min(1, ratio).
    """
    if temp <= 0:
        if de < 0:
            return F32(1.0)
        if de > 0:
            return F32(0.0)
        return min(F32(1.0), ratio)
    if ratio <= 0:
        return F32(0.0)
    a = -de / temp + math.log(ratio)
    if a >= 0:
        return F32(1.0)
    return math.exp(a)


@numba.njit(inline="always")
def mh_step(q, g, mo, ve, adam, lr, b1, b2, c1, c2, aeps, qmax, m, eps, dst_on, h, temp,
            u_mix, u_prop, u_acc):
    """One Metropolis-Hastings transition of one weight: (new state, proposed state, dE).

    mo, ve are the Adam moments before this step (ignored for adam=0). The reverse proposal
    Q(y -> q) is the same proposal made from y, whose gradient is estimated as g + h dv.
    """
    dw = drift(g, mo, ve, adam, lr, b1, b2, c1, c2, aeps)
    y = mh_propose(q, dw, qmax, m, eps, dst_on, u_mix, u_prop)
    if y == q:
        return q, q, F32(0.0)
    dv = F32(y - q) / F32(qmax)
    de = energy_delta(g, h, dv)
    fwd = mh_proposal_prob(q, y, dw, qmax, m, eps, dst_on)
    dw_rev = drift(g + h * dv, mo, ve, adam, lr, b1, b2, c1, c2, aeps)
    rev = mh_proposal_prob(y, q, dw_rev, qmax, m, eps, dst_on)
    if u_acc < mh_accept_prob(de, temp, rev / fwd):
        return y, y, de
    return q, y, de


# ----------------------------------------------------------------------------------------------
# latent-free momentum threshold for Z_N (the ternary analogue of Bop, Helwegen et al. 2019)

@numba.njit(inline="always")
def bop_step(q, g, mo, ve, gamma, gamma2, thr, norm, reset, qmax):
    """One Bop-ternary update of one weight: (new state, new momentum, new second moment).

    mo <- (1 - gamma) mo + gamma g; with norm=1 also ve <- (1 - gamma2) ve + gamma2 g^2 and the
    signal is s = mo / (sqrt(ve) + 1e-8), else s = mo. When |s| > thr the weight moves one state
    against the sign of s (the descent direction: +1 -> 0 -> -1 for s > 0), unless that leaves
    Z_N; after a move the momentum is zeroed when reset=1.
    """
    mo = (F32(1.0) - gamma) * mo + gamma * g
    s = mo
    if norm != 0:
        ve = (F32(1.0) - gamma2) * ve + gamma2 * g * g
        s = mo / (math.sqrt(ve) + F32(1e-8))
    if abs(s) > thr:
        y = q - 1 if s > 0 else q + 1
        if -qmax <= y <= qmax:
            q = y
            if reset != 0:
                mo = F32(0.0)
    return q, mo, ve
