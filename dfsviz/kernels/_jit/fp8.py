"""e4m3 quantization in Triton: the launcher twins of :func:`dfsviz.kernels.fp8.quantize_qk_fp8`
(block-wise Q and K) and :func:`~dfsviz.kernels.fp8.quantize_v_fp8` (per-channel V) for FP8
attention, three launches for all three tensors, and of
:func:`dfsviz.kernels.fp8_linear.quantize_rows_fp8` (per-row activations) for FP8 linear layers,
one; bit for bit the simulation's scales and e4m3 bytes (given the key mean, a float32 sum whose
rounding depends on its order), where chains of PyTorch element-wise kernels ran."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import interpreting
from dfsviz.kernels.fp8 import P_BYTE_ONE, Fp8QK

__all__ = ["P_BYTE_ONE_MAGIC", "ROUNDING_MAGIC", "mma_key_order", "p_e4m3", "quantize_attention_fp8_fwd",
           "quantize_rows_fp8_fwd"]

#: 1.5 x 2^23: a float32 near it has unit steps, so adding it rounds to an integer (to nearest
#: even) that its low mantissa bits hold as ROUNDING_MAGIC's bits + that integer.
ROUNDING_MAGIC = tl.constexpr(12582912.0)
#: ROUNDING_MAGIC + P_BYTE_ONE: x 8 + this holds p_e4m3's byte in its low bits.
P_BYTE_ONE_MAGIC = tl.constexpr(ROUNDING_MAGIC.value + P_BYTE_ONE)
#: 2^120: an e4m3 byte moved 20 bits up is a float32 of 2^-120 times its e4m3 value (e4m3's
#: exponent bias is 7, float32's 127); this multiplies it back exactly.
E4M3_BITS_SCALE = tl.constexpr(2.0**120)


@triton.jit
def _pow2(e):
    """2^e as float32 for integer e in [-126, 127] (exact, from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_scale(amax):
    """The simulation's ``_pow2_scales``: the smallest 2^e with amax / 2^e <= 448, 1 for a zero
    (or underflowing) amax, amax itself when it is not finite."""
    # The smallest 2^e with amax / 2^e <= 448 = 1.75 x 2^8: amax = m 2^p (m in [1, 2)) gives
    # e = p - 8 when m <= 1.75, else p - 7 (what frexp of amax / 448 gives, without the division).
    # A subnormal amax is scaled up by 2^64 first, so its exponent bits are those of a normal number.
    tiny = amax < 1.1754944e-38
    bits = tl.where(tiny, amax * 18446744073709551616.0, amax).to(tl.int32, bitcast=True)
    p = ((bits >> 23) & 0xFF) - 127 - tl.where(tiny, 64, 0)
    e = p - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    # 2^e for e below -126 (subnormal scales) as a product of two powers of two, exact when representable
    lo = tl.maximum(e, -126)
    scale = _pow2(lo) * _pow2(tl.maximum(e - lo, -126))
    finite = amax < float("inf")  # False for inf and NaN
    # zero blocks keep 1, as do blocks so small that amax / 448 underflows to 0 in the simulation
    return tl.where(finite, tl.where((amax > 0) & (scale > 0), scale, 1.0), amax)


@triton.jit
def p_e4m3(x):
    """``"fp8_pv"``'s P_SCALE * P (:func:`dfsviz.kernels.fp8.p_e4m3`) for x = t - M <= 0 (-inf
    gives 0), as float32: the e4m3 byte round(8 x) + P_BYTE_ONE (0 below) sits in the low bits of
    8 x + P_BYTE_ONE_MAGIC; moved 20 bits up it is a float32 of the same mantissa and exponent
    bits, 2^-120 times the e4m3 value (subnormals included), multiplied back exactly."""
    bits = tl.maximum(x * 8.0 + P_BYTE_ONE_MAGIC, ROUNDING_MAGIC).to(tl.int32, bitcast=True)
    return (bits << 20).to(tl.float32, bitcast=True) * E4M3_BITS_SCALE


@triton.jit
def _round_e4m3(y):
    """float32 y rounded to nearest even on e4m3's grid (step 2^(exponent - 3), 2^-9 below
    2^-6), as float32; |y| must not exceed 448 (the interpreter's float8 cast does not round
    to nearest even)."""
    ey = ((tl.abs(y).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = _pow2(tl.maximum(ey, -6) - 3)
    return ((tl.div_rn(y, step) + ROUNDING_MAGIC) - ROUNDING_MAGIC) * step


@triton.jit
def _e4m3_byte(y, SOFTWARE: tl.constexpr):
    """The e4m3 byte (uint8) of float32 y (|y| <= 448, or NaN), rounded to nearest even: the
    GPU's conversion, or with SOFTWARE written from the float32 bits (the interpreter's float8
    cast neither rounds to nearest even nor gets NaN right)."""
    if not SOFTWARE:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    y = _round_e4m3(y)
    ay = tl.abs(y).to(tl.int32, bitcast=True)
    ey = ((ay >> 23) & 0xFF) - 127  # again: rounding may reach the next power of two
    normal = ((ey + 7) << 3) | ((ay >> 20) & 0x7)
    subnormal = (tl.abs(y) * 512.0).to(tl.int32)  # multiples of 2^-9 below 2^-6: 0 .. 7
    byte = tl.where(ey >= -6, normal, subnormal) | ((y.to(tl.int32, bitcast=True) >> 24) & 0x80)
    return tl.where(y == y, byte, 0x7F).to(tl.uint8)  # NaN


@triton.jit
def _divided(x, scale):
    """x / scale for power-of-two (or non-finite) scales, as IEEE division gives it: products with
    1 / scale, which is exact, taken in two normal factors where it would overflow (a subnormal
    scale); NaN and infinities follow as in the division."""
    subnormal = scale < 1.1754944e-38
    lifted = tl.where(subnormal, scale * 8.507059e37, scale)  # times 2^126: normal
    first = tl.where(subnormal, 8.507059e37, 1.0)
    return x * first * tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), lifted)


@triton.jit
def _load_tokens(X, PERM, blk, bh, stride_xb, stride_xh, stride_xn, H, N,
                 TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PERM: tl.constexpr):
    """Ordered positions blk * TOKENS + [0, TOKENS) of (batch, head) bh: (positions, in range,
    channels, x float32 [TOKENS, D] gathered through PERM, zeros past N)."""
    b, h = bh // H, bh % H
    pos = blk * TOKENS + tl.arange(0, TOKENS)
    ok = pos < N
    src = tl.load(PERM + pos, mask=ok, other=0).to(tl.int64) if HAS_PERM else pos.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + src[:, None] * stride_xn + d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    return pos, ok, d, x


@triton.jit
def _key_value_stats_kernel(
    K, V, KSUM, VMAX,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, H, N, CHUNKS,
    CHUNK: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_V: tl.constexpr,
):
    """CHUNK tokens of one (batch, head), TOKENS at a time (any token order will do): k's sum
    over them per channel, and with HAS_V v's max |v| per channel (NaN when one is NaN), into
    row (bh, chunk) of KSUM / VMAX [B * H, CHUNKS, D] float32."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([TOKENS, HEAD_DIM], tl.float32)
    vmax = tl.zeros([TOKENS, HEAD_DIM], tl.float32)
    for step in range(0, CHUNK // TOKENS):  # tokens in their original order (K, V: placeholders for PERM)
        blk = chunk * (CHUNK // TOKENS) + step
        ksum += _load_tokens(K, K, blk, bh, stride_kb, stride_kh, stride_kn, H, N, TOKENS, HEAD_DIM, False)[3]
        if HAS_V:
            y = _load_tokens(V, V, blk, bh, stride_vb, stride_vh, stride_vn, H, N, TOKENS, HEAD_DIM, False)[3]
            vmax = tl.maximum(vmax, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
    row = (bh * CHUNKS + chunk) * HEAD_DIM + d
    tl.store(KSUM + row, tl.sum(ksum, axis=0))
    if HAS_V:  # (tl.max drops NaN; torch's amax keeps it)
        nan = tl.max((vmax != vmax).to(tl.int32), axis=0) > 0
        tl.store(VMAX + row, tl.where(nan, float("nan"), tl.max(vmax, axis=0)))


@triton.jit
def _key_mean_v_scale_kernel(KSUM, VMAX, MEAN, VSCALE, N, CHUNKS, HEAD_DIM: tl.constexpr, HAS_V: tl.constexpr):
    """One (batch, head): the chunks' sums in chunk order over N, k's mean [D]; with HAS_V each
    channel's power-of-two scale from the chunks' maxima."""
    bh = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([HEAD_DIM], tl.float32)
    vmax = tl.zeros([HEAD_DIM], tl.float32)
    for chunk in range(0, CHUNKS):
        row = (bh * CHUNKS + chunk) * HEAD_DIM + d
        ksum += tl.load(KSUM + row)
        if HAS_V:
            vmax = tl.maximum(vmax, tl.load(VMAX + row), propagate_nan=tl.PropagateNan.ALL)
    tl.store(MEAN + bh * HEAD_DIM + d, tl.div_rn(ksum, tl.full([HEAD_DIM], N, tl.float32)))
    if HAS_V:
        tl.store(VSCALE + bh * HEAD_DIM + d, _pow2_scale(vmax))


@triton.jit
def _quantize_block(X, PERM, MEAN, OUT, SCALE, blk, bh, stride_xb, stride_xh, stride_xn, H, N, M,
                    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MEAN: tl.constexpr,
                    SOFTWARE: tl.constexpr):
    """One block of BLOCK ordered tokens of one (batch, head): smooth, scale, round to e4m3."""
    pos, ok, d, x = _load_tokens(X, PERM, blk, bh, stride_xb, stride_xh, stride_xn, H, N, BLOCK, HEAD_DIM, HAS_PERM)
    if HAS_MEAN:
        x = tl.where(ok[:, None], x - tl.load(MEAN + bh * HEAD_DIM + d)[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    nan = tl.max(tl.max((x != x).to(tl.int32), axis=1), axis=0) > 0  # tl.max drops NaN; torch's amax keeps it
    scale = _pow2_scale(tl.where(nan, float("nan"), amax))
    byte = _e4m3_byte(_divided(x, scale), SOFTWARE)
    tl.store(OUT + bh * N * HEAD_DIM + pos[:, None] * HEAD_DIM + d[None, :], byte, mask=ok[:, None])
    tl.store(SCALE + bh * M + blk, scale)


@triton.jit
def _quantize_channels(X, PERM, VSCALE, OUT, blk, bh, stride_xb, stride_xh, stride_xn, H, N, NPAD,
                       TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PERM: tl.constexpr, SOFTWARE: tl.constexpr,
                       MMA_ORDER: tl.constexpr):
    """TOKENS ordered tokens of one (batch, head): each channel scaled by its power of two, rounded
    to e4m3 and stored transposed, [D, NPAD]; MMA_ORDER: each 32 keys in the order of mma_key_order."""
    pos, ok, d, x = _load_tokens(X, PERM, blk, bh, stride_xb, stride_xh, stride_xn, H, N, TOKENS, HEAD_DIM, HAS_PERM)
    scale = tl.load(VSCALE + bh * HEAD_DIM + d)
    byte = tl.trans(_e4m3_byte(_divided(x, scale[None, :]), SOFTWARE))  # [D, TOKENS]: rows of TOKENS bytes
    if MMA_ORDER:  # key 32 a + 16 g1 + 8 g0 + 2 c + e to position 32 a + 16 g1 + 4 c + 2 g0 + e
        byte = tl.reshape(tl.permute(tl.reshape(byte, [HEAD_DIM, TOKENS // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5)),
                          [HEAD_DIM, TOKENS])
    # Up to NPAD (a multiple of 16), not N: the zeros past N fill the padding, and the store moves
    # 16 bytes at a time (a mask that changes at N would store byte by byte)
    tl.store(OUT + bh * HEAD_DIM * NPAD + d[:, None] * NPAD + pos[None, :], byte, mask=(pos < NPAD)[None, :])


@triton.jit
def _quantize_attention_kernel(
    Q, K, V, PERM, MEAN, VSCALE, Q8, K8, V8, QSCALE, KSCALE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N, M, MV, NPAD,
    BLOCK: tl.constexpr, V_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PERM: tl.constexpr,
    SOFTWARE: tl.constexpr, MMA_ORDER: tl.constexpr,
):
    """Axis 2 picks the tensor: q's block blk (0), k's, smoothed by MEAN (1), or v's tokens
    blk * V_TOKENS onwards by channel (2, the "fp8_pv" grid's); programs past a tensor's end return."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)
    if which == 0:
        if blk < M:
            _quantize_block(Q, PERM, MEAN, Q8, QSCALE, blk, bh, stride_qb, stride_qh, stride_qn, H, N, M, BLOCK,
                            HEAD_DIM, HAS_PERM, False, SOFTWARE)
    elif which == 1:
        if blk < M:
            _quantize_block(K, PERM, MEAN, K8, KSCALE, blk, bh, stride_kb, stride_kh, stride_kn, H, N, M, BLOCK,
                            HEAD_DIM, HAS_PERM, True, SOFTWARE)
    elif blk < MV:
        _quantize_channels(V, PERM, VSCALE, V8, blk, bh, stride_vb, stride_vh, stride_vn, H, N, NPAD, V_TOKENS,
                           HEAD_DIM, HAS_PERM, SOFTWARE, MMA_ORDER)


#: Tokens per program of the V quantization (each program stores D rows of that many bytes), and
#: the multiple its transposed rows are padded to (tensor descriptors need 16-byte row strides;
#: the MMA order permutes keys within each 32).
_V_TOKENS = 128
_V_ROW_ALIGN = 16
_V_MMA_ROW_ALIGN = 32
#: Tokens per program of the statistics pass, and per step within it (at Wan2.1-1.3B 480p,
#: N 32,760 and 12 heads, 768 programs), and the warps of each pass's programs (the fastest of
#: 4 and 8 for each on one H100 at both Wan shapes, kernels_fp8_quant_ab_h100.json).
_STATS_CHUNK = 512
_STATS_TOKENS = 64
_STATS_WARPS = 4
_QUANT_WARPS = 8


def mma_key_order(n: int) -> torch.Tensor:
    """The key stored at each position of an MMA-ordered V row of n positions (n a multiple of
    32): within each 32, key 16 g1 + 8 g0 + 2 c + e at position 16 g1 + 4 c + 2 g0 + e. That is
    the order in which Hopper's FP8 MMA takes P . V's register operand P from the registers that
    hold P's logits (thread c of a row's quad holds keys 2 c, 2 c + 1 of every 8 and needs keys
    4 c .. 4 c + 3 of every 16): with V's keys so stored, P is relabelled, not moved."""
    pos = torch.arange(n)
    g1, c, g0, e = (pos >> 4) & 1, (pos >> 2) & 3, (pos >> 1) & 1, pos & 1
    return (pos & ~31) | (g1 << 4) | (g0 << 3) | (c << 1) | e


def quantize_attention_fp8_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, block: int,
                               perm: torch.Tensor | None, mma_order: bool = False):
    """:func:`~dfsviz.kernels.fp8.quantize_qk_fp8` and, given v (``"fp8_pv"``),
    :func:`~dfsviz.kernels.fp8.quantize_v_fp8` on validated kernel inputs, in three launches: k's
    sum (and v's channel maxima) over chunks of tokens, then k's mean (and v's channel scales), then
    every block of q, k and v at once. q, k, v [B, H, N, D] with unit stride along D, in the original
    order; ``perm`` int32 [N] or None.

    Returns (Fp8QK, v8, v_scale): bit for bit the simulation's bytes and scales given the key mean,
    which is k's float32 sum in a fixed order over N (so within float32 rounding of
    :func:`~dfsviz.kernels.fp8.key_mean`); v8 (None without v) the [B, H, N, D] float8_e4m3fn view
    of a [B, H, D, N'] buffer (N' = N rounded up to 16): stride 1 along N, the layout FP8 matrix
    instructions take P . V's second operand in. ``mma_order`` (the Gluon kernel's): keys in the
    order of :func:`mma_key_order` within each 32, N' = N rounded up to 32 and v8 spans all N'
    (keys past N are zeros)."""
    bsz, heads, n, d = q.shape
    bh, m = bsz * heads, triton.cdiv(n, block)
    dev = q.device
    has_v = v is not None
    v_in = v if has_v else k  # without v, k stands in for it (never read)
    chunks = triton.cdiv(n, _STATS_CHUNK)
    ksum = torch.empty((bh, chunks, d), dtype=torch.float32, device=dev)
    vmax = torch.empty_like(ksum) if has_v else ksum
    _key_value_stats_kernel[(chunks, bh)](
        k, v_in, ksum, vmax, *k.stride()[:3], *v_in.stride()[:3], heads, n, chunks,
        CHUNK=_STATS_CHUNK, TOKENS=_STATS_TOKENS, HEAD_DIM=d, HAS_V=has_v, num_warps=1 if interpreting() else _STATS_WARPS,
    )
    mean = torch.empty((bsz, heads, 1, d), dtype=torch.float32, device=dev)
    v_scale = torch.empty((bsz, heads, d), dtype=torch.float32, device=dev) if has_v else None
    _key_mean_v_scale_kernel[(bh,)](ksum, vmax, mean, v_scale if has_v else mean, n, chunks, HEAD_DIM=d,
                                    HAS_V=has_v, num_warps=1)
    q8 = torch.empty((bsz, heads, n, d), dtype=torch.uint8, device=dev)  # e4m3 bytes
    k8 = torch.empty_like(q8)
    q_scale = torch.empty((bsz, heads, m), dtype=torch.float32, device=dev)
    k_scale = torch.empty_like(q_scale)
    align = _V_MMA_ROW_ALIGN if mma_order else _V_ROW_ALIGN
    npad = triton.cdiv(n, align) * align
    v8 = torch.empty((bsz, heads, d, npad), dtype=torch.uint8, device=dev) if has_v else q8  # transposed
    mv = triton.cdiv(n, _V_TOKENS) if has_v else 0
    _quantize_attention_kernel[(max(m, mv), bh, 3 if has_v else 2)](
        q, k, v_in, perm if perm is not None else q_scale, mean, v_scale if has_v else mean,
        q8, k8, v8, q_scale, k_scale, *q.stride()[:3], *k.stride()[:3], *v_in.stride()[:3], heads, n, m, mv, npad,
        BLOCK=block, V_TOKENS=_V_TOKENS, HEAD_DIM=d, HAS_PERM=perm is not None, SOFTWARE=interpreting(),
        MMA_ORDER=mma_order, num_warps=1 if interpreting() else _QUANT_WARPS,
    )
    quant = Fp8QK(q8.view(torch.float8_e4m3fn), q_scale, k8.view(torch.float8_e4m3fn), k_scale, mean, block)
    if not has_v:
        return quant, None, None
    return quant, v8.view(torch.float8_e4m3fn)[..., :npad if mma_order else n].transpose(-1, -2), v_scale


@triton.jit
def _quantize_rows_kernel(X, OUT, SCALE, stride_xm, K, BLOCK_K: tl.constexpr, SOFTWARE: tl.constexpr):
    """One row of X [M, K]: its max |x| (a first pass over the row), its power-of-two scale, then
    the row scaled and rounded to e4m3 (a second pass, which finds the row in the L2 cache)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    nan = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_xm + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        nan = nan | (x != x).to(tl.int32)  # tl.maximum drops NaN; torch's amax keeps it
    amax_row = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(amax, axis=0))
    scale = _pow2_scale(amax_row)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        x = tl.load(X + row * stride_xm + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row * K + k0 + cols, _e4m3_byte(_divided(x, scale), SOFTWARE), mask=ok)
    tl.store(SCALE + row, scale)


#: Channels per step of the row pass (a row of K channels takes ceil(K / _ROW_CHUNK) steps per pass).
_ROW_CHUNK = 1024


def quantize_rows_fp8_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~dfsviz.kernels.fp8_linear.quantize_rows_fp8` on a validated kernel input: x [M, K]
    with unit stride along K. Returns (x8 float8_e4m3fn [M, K] contiguous, scales float32 [M, 1])."""
    rows, k = x.shape
    out = torch.empty((rows, k), dtype=torch.uint8, device=x.device)  # e4m3 bytes
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](
            x, out, scales, x.stride(0), k, BLOCK_K=min(_ROW_CHUNK, triton.next_power_of_2(k)),
            SOFTWARE=interpreting(), num_warps=1 if interpreting() else 4,
        )
    return out.view(torch.float8_e4m3fn), scales
