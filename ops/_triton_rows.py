"""Triton device functions shared by the row-wise kernels (the fused decode step, the SGLU gate). Imported
only where those kernels are built, so triton is imported lazily with them."""
import triton
import triton.language as tl


@triton.jit
def row_rms_rsqrt(X, eps, D: tl.constexpr, BD: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of the D elements at X, summed in fp32, BD at a time: the per-row scale of a
    weightless SRMSNorm folded into a following kernel."""
    dd = tl.arange(0, BD)
    acc = tl.zeros([BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        xx = tl.load(X + d0 + dd, mask=d0 + dd < D, other=0.0).to(tl.float32)
        acc += xx * xx
    return tl.rsqrt(tl.sum(acc, 0) / D + eps)


@triton.jit
def apply_act(a, ACT: tl.constexpr):
    """The decode kernels' activation codes on fp32 values: 0 none, 1 silu (swish), 2 relu."""
    if ACT == 1:
        a = a * tl.sigmoid(a)
    elif ACT == 2:
        a = tl.maximum(a, 0.0)
    return a


@triton.jit
def gla_state_load(S_IN, base, ee, vv, me, mv, E: tl.constexpr, LRPE: tl.constexpr):
    """The (head, block of value columns) tile of the decode step's state: rows ee, columns vv of the [Dk, E] head
    state at ``base`` (fp32); with LRPE (Dk = 2E) the cos and the sin halves (s1, s2), else (s1, s1)."""
    m2 = me[:, None] & mv[None, :]
    tile = ee[:, None] * E + vv[None, :]
    s1 = tl.load(S_IN + base + tile, mask=m2, other=0.0)
    if LRPE:
        s2 = tl.load(S_IN + base + E * E + tile, mask=m2, other=0.0)
    else:
        s2 = s1
    return s1, s2


@triton.jit
def gla_state_step(s1, s2, S_OUT, base, ee, vv, me, mv, qf, kf, v, lam, ang, REF, E: tl.constexpr,
                   LRPE: tl.constexpr):
    """One (head, block of value columns) tile of the decode step's token mixer on the tile (s1, s2) read by
    ``gla_state_load``: S <- lam S + k^T v, written once to S_OUT, then the readout o = q S of the block's columns
    (fp32 [BV]). qf, kf: the activated q and k (fp32 holding values of the input dtype, REF's element type);
    v: the block's v (fp32); ang: the fp32 LRPE angles theta * pos (unused without LRPE). With LRPE the angles
    are reduced to [-pi, pi] before cos and sin (they reach 1e5 rad and more): n 2pi subtracted in fp64 with
    2pi split into an fp32 head and tail (n * head is exact), error ~1e-10 rad; q cos, q sin, k cos and
    k sin are rounded to the input dtype, as the model does."""
    DT = REF.dtype.element_ty
    m2 = me[:, None] & mv[None, :]
    tile = ee[:, None] * E + vv[None, :]
    if LRPE:
        a64 = ang.to(tl.float64)
        n = tl.floor(a64 * 0.15915494309189535 + 0.5)
        red = ((a64 - n * 6.2831854820251465) - n * -1.7484555314695172e-07).to(tl.float32)
        c = tl.cos(red)
        sn = tl.sin(red)
        q1 = (qf * c).to(DT).to(tl.float32)
        q2 = (qf * sn).to(DT).to(tl.float32)
        k1 = (kf * c).to(DT).to(tl.float32)
        k2 = (kf * sn).to(DT).to(tl.float32)
        s1 = lam * s1 + k1[:, None] * v[None, :]
        tl.store(S_OUT + base + tile, s1, mask=m2)
        s2 = lam * s2 + k2[:, None] * v[None, :]
        tl.store(S_OUT + base + E * E + tile, s2, mask=m2)
        o = tl.sum(q1[:, None] * s1, 0) + tl.sum(q2[:, None] * s2, 0)
    else:
        s1 = lam * s1 + kf[:, None] * v[None, :]
        tl.store(S_OUT + base + tile, s1, mask=m2)
        o = tl.sum(qf[:, None] * s1, 0)
    return o


@triton.jit
def gla_state_tile(S_IN, S_OUT, base, ee, vv, me, mv, qf, kf, v, lam, ang, REF, E: tl.constexpr,
                   LRPE: tl.constexpr):
    """``gla_state_load`` from S_IN, then ``gla_state_step`` to S_OUT: the tile read once and written once."""
    s1, s2 = gla_state_load(S_IN, base, ee, vv, me, mv, E, LRPE)
    return gla_state_step(s1, s2, S_OUT, base, ee, vv, me, mv, qf, kf, v, lam, ang, REF, E, LRPE)
