"""FP8 attention inputs: block-wise e4m3 quantization of Q and K (and per-channel of V), and the
PyTorch simulation that is the reference twin of ``block_sparse_attention(..., precision="fp8")``
and ``precision="fp8_pv"``.

The scheme (SageAttention's, with power-of-two scales):

1. K is smoothed: its mean over the N tokens, mu [B, H, 1, D], is subtracted. Every logit of
   a query row i then drops by the same q_i . mu, so the softmax (and the output) is
   unchanged, while the shared offset that keys of a video model carry (and that would use up
   FP8's 3 mantissa bits) is gone. The LSE is corrected back by scale * q_i . mu.
2. Q and the smoothed K are cut into the mask's blocks of ``block`` tokens of the ordered
   sequence; each block gets one scale 2^e, the smallest power of two with
   max |x| / 2^e <= 448 (e4m3's largest finite value), and is stored as
   ``float8_e4m3fn(x / 2^e)`` (round to nearest even). A power of two makes x / 2^e and the
   dequantization exact, so the kernel's logits are exactly 2^(e_q + e_k) times an FP8
   matrix product with float32 accumulation, and the simulation reproduces them in float32.
3. ``"fp8"``: P . V runs in the input dtype (P rounded to it, float32 accumulation), as the
   native kernel does. ``"fp8_pv"``: P . V in e4m3 too. V (ordered) gets one power-of-two
   scale per (batch, head, channel) over all N tokens, the same rule as above: P . V sums over
   tokens, so a per-channel scale factors out of the whole sum and the matrix products
   accumulate into one float32 accumulator, dequantized once at the end. P_SCALE * P is an
   e4m3 value built without an exponential (:func:`p_e4m3`): with x = t - M, t the row's
   logits in the log2 domain and M the running row max rounded up to an integer, 8 x is
   rounded to an integer n (to nearest even) and the e4m3 value whose bits are n + 120 (0
   below) is P_SCALE * P: 2^x with x rounded to eighths and the power of two between whole
   exponents taken linearly, 2^floor(x) (1 + x - floor(x)): at most one e4m3 step from 2^x
   rounded to nearest in e4m3's normal range (within 10.8 % of 2^x where rounding to nearest
   stays within 5.9 %; 4 % high on average, which the normalization by l cancels), without the
   special-function unit's exponentials, which bound the FP8 kernel on Hopper
   (docs/kernels.md).
   P_SCALE = 2^8 maps x in (-1, 0] onto (128, 256] inside e4m3's range, and as M only moves by
   whole powers of two (n by multiples of 8), the rescaling of earlier products is exact and
   forming P against the running M gives the values the final M gives, so the simulation
   needs no key order. The row sum l is that of the same e4m3 P, so each output row is a
   weighted mean of V's rows.

Error: e4m3 keeps 3 mantissa bits, so each quantized entry is within 2^-4 (relative) of
its input and a logit q . k * scale moves by at most about 2^-3 scale sum_d |q_d| |k_d|.
For unit-variance q, v and keys sharing an offset (N 1000, D 64 / 128, 60 % of blocks kept,
5 seeds) the output is within 0.040-0.048 (max) and 0.002 (mean) of float64 attention of
the unquantized inputs, about 4x the bfloat16 reference's max error (0.010-0.012) and 30x
the float16 one's; with P . V in e4m3 too within 0.056-0.064 (max) and 0.003 (mean)
(docs/kernels.md, the table of the FP8 section).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfsviz.sparse._validate import num_blocks, resolve_scale
from dfsviz.sparse.attention import block_sparse_attention_ref, check_attention_inputs, check_order_for
from dfsviz.sparse.masks import BlockMask

__all__ = ["FP8_DTYPE", "FP8_MAX", "FP8_PRECISIONS", "P_BYTE_ONE", "P_SCALE", "Fp8QK",
           "block_sparse_attention_fp8_ref", "dequantize_fp8_blocks", "key_mean", "p_e4m3", "quantize_fp8_blocks",
           "quantize_qk_fp8", "quantize_v_fp8"]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: P in (0, 1] times this power of two is what ``precision="fp8_pv"`` holds in e4m3.
P_SCALE = 256.0
#: The e4m3 bits of P_SCALE * 2^x are 8 x + P_BYTE_ONE (x a multiple of 1/8, e4m3's exponent bias 7).
P_BYTE_ONE = 8 * (8 + 7)
#: The precisions of ``block_sparse_attention`` that this module simulates.
FP8_PRECISIONS = ("fp8", "fp8_pv")
_LOG2E = 1.4426950408889634


def _pow2_scales(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two 2^e with amax / 2^e <= 448 (1 where amax is 0 or 2^e is below
    float32's range; amax where it is not finite, so NaN and inf flow on)."""
    # From amax's own exponent and mantissa, exact for a subnormal amax too (amax / 448 would
    # round there): amax = f 2^p with f in [0.5, 1), and 448 = 0.875 x 2^9, so 2^(p - 9) suffices
    # unless f > 0.875, which takes 2^(p - 8).
    frac, exp = torch.frexp(amax)
    scales = torch.ldexp(torch.ones_like(amax), exp - 9 + (frac > 0.875).to(exp.dtype))
    scales = torch.where((amax > 0) & (scales > 0), scales, torch.ones_like(amax))
    return torch.where(torch.isfinite(amax), scales, amax)


def quantize_fp8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization along the token axis.

    Args:
        x: [B, H, N, D] float tensor (any float dtype).
        block: tokens per block; the last block may be short.

    Returns:
        (x8 float8_e4m3fn [B, H, N, D] contiguous, scales float32 [B, H, ceil(N / block)]), with
        scale = the smallest power of two such that max |x| over the block's tokens and
        channels / scale <= 448 (1 for an all-zero block) and x8 = fp8(x / scale). Non-finite
        blocks get a non-finite scale (NaN flows on, as in dense attention).
    """
    bsz, heads, n, d = x.shape
    m = num_blocks(n, block)
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, 0, 0, m * block - n))
    scales = _pow2_scales(padded.reshape(bsz, heads, m, block * d).abs().amax(dim=-1))
    per_token = scales.repeat_interleave(block, dim=2)[:, :, :n, None]
    return (xf / per_token).to(FP8_DTYPE).contiguous(), scales


def dequantize_fp8_blocks(x8: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """float32 [B, H, N, D] = x8 * scale of its block (exact: scales are powers of two)."""
    n = x8.shape[2]
    return x8.float() * scales.repeat_interleave(block, dim=2)[:, :, :n, None]


@dataclass(frozen=True)
class Fp8QK:
    """Quantized attention inputs over the ordered sequence.

    Fields:
        q8, k8: float8_e4m3fn [B, H, N, D], contiguous, in the ordered sequence; k8 smoothed.
        q_scale, k_scale: float32 [B, H, Mq] / [B, H, Mk], one power of two per block.
        k_mean: float32 [B, H, 1, D], the key mean subtracted before quantization.
        block: tokens per block (the mask's).
    """

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    block: int

    def lse_shift(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """float32 [B, H, N]: scale * q_i . mu, what smoothing took off row i's logits (q in any order)."""
        return (q.float() @ self.k_mean.transpose(-1, -2)).squeeze(-1) * scale


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """float32 [B, H, 1, D]: the mean of k [B, H, N, D] over its tokens (any token order),
    accumulated in float32 without a float32 copy of k."""
    return torch.mean(k, dim=2, keepdim=True, dtype=torch.float32)


def quantize_qk_fp8(q: torch.Tensor, k: torch.Tensor, block: int, perm: torch.Tensor | None = None) -> Fp8QK:
    """Smooth k by its token mean, then quantize q and k block-wise to e4m3 (module docstring).

    Args:
        q, k: [B, H, N, D] float, in the original token order when ``perm`` is given.
        block: the mask's tokens per block.
        perm: optional int [N] on q's device: position p of the ordered sequence holds token
            perm[p]; q and k are gathered through it before quantization.
    """
    k_mean = key_mean(k)  # over the tokens as given: the kernel's launcher takes it so too
    if perm is not None:
        q, k = q.index_select(2, perm), k.index_select(2, perm)
    q8, q_scale = quantize_fp8_blocks(q, block)
    k8, k_scale = quantize_fp8_blocks(k.float() - k_mean, block)
    return Fp8QK(q8, q_scale, k8, k_scale, k_mean, block)


def quantize_v_fp8(v: torch.Tensor, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel e4m3 quantization of v over all its tokens (``precision="fp8_pv"``).

    Args:
        v: [B, H, N, D] float, in the original token order when ``perm`` is given.
        perm: optional int [N] on v's device: v is gathered through it (the ordered sequence).

    Returns:
        (v8 float8_e4m3fn [B, H, N, D] ordered, scales float32 [B, H, D]): per (batch, head,
        channel) the smallest power of two 2^e with max |v| / 2^e <= 448 over the N tokens
        (1 for an all-zero channel), and v8 = fp8(v / 2^e) rounded to nearest even.
    """
    if perm is not None:
        v = v.index_select(2, perm)
    vf = v.float()
    scales = _pow2_scales(vf.abs().amax(dim=2))
    return (vf / scales[:, :, None, :]).to(FP8_DTYPE), scales


def p_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``"fp8_pv"``'s P_SCALE * P for x = t - M <= 0 (log2 domain; -inf gives 0), as float32
    values of e4m3: the e4m3 number whose bits are round(8 x) + P_BYTE_ONE, 0 where that is
    negative (module docstring). 2^floor(u) (1 + u - floor(u)) times P_SCALE for u = x rounded
    to eighths, down to e4m3's subnormals (below 2^-6, steps of 2^-9)."""
    byte = (torch.round(8 * x.float()) + P_BYTE_ONE).clamp(0, P_BYTE_ONE)
    return byte.to(torch.uint8).view(FP8_DTYPE).float()


def _attention_fp8_pv(qd, kd, v8, v_scale, mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float32 [B, H, N, D], lse float32 [B, H, N]) over the ordered sequence, from the
    dequantized q, k (float32) and e4m3 v with its channel scales: P formed in e4m3 as the
    kernel forms it (:func:`p_e4m3`), products exact, sums in float32. One query block at a
    time against every key, the kept blocks selected by the mask's dense form."""
    n = qd.shape[2]
    block = mask.block
    keep = mask.to_dense().to(qd.device)
    key_block = torch.arange(n, device=qd.device) // block
    vf = v8.float()
    out = torch.zeros(vf.shape, dtype=torch.float32, device=qd.device)
    lse = torch.full(qd.shape[:3], float("-inf"), dtype=torch.float32, device=qd.device)
    for u in range(mask.num_q_blocks):
        rows = slice(u * block, min(n, (u + 1) * block))
        kept = keep[:, :, u][..., key_block][:, :, None, :]  # [B, H, 1, N]
        t = ((qd[:, :, rows] @ kd.transpose(-1, -2)) * (scale * _LOG2E)).masked_fill(~kept, float("-inf"))
        top = torch.ceil(t.amax(dim=-1, keepdim=True))  # -inf for a block that keeps nothing
        p8 = torch.where(kept, p_e4m3(t - top), 0.0)  # P_SCALE * P
        l = p8.sum(dim=-1, keepdim=True)
        attends = kept.any(dim=-1, keepdim=True)
        out[:, :, rows] = torch.where(attends, (p8 @ vf) * v_scale[:, :, None, :] / l, 0.0)
        lse[:, :, rows] = ((top + torch.log2(l / P_SCALE)) / _LOG2E).squeeze(-1)
    return out, lse


def block_sparse_attention_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    order=None,
    scale: float | None = None,
    return_lse: bool = False,
    precision: str = "fp8",
):
    """Block-sparse attention with FP8 Q and K (and P . V), simulated in PyTorch (any device).

    Same signature and result layout as ``block_sparse_attention_ref``: q, k, v [B, H, N, D]
    (one float dtype and device, original order when ``order`` is given), mask over the
    ordered sequence. Q and K are quantized exactly as the FP8 kernel quantizes them
    (:func:`quantize_qk_fp8`) and dequantized exactly. ``precision="fp8"`` attends them in
    float32 with v in float32; ``"fp8_pv"`` also quantizes v (:func:`quantize_v_fp8`) and P
    as the kernel does (module docstring). out is returned in the input dtype, lse float32
    [B, H, N] of the unsmoothed logits. Non-finite inputs are refused (ValueError naming the
    first), as by the reference.
    """
    check_attention_inputs(q, k, v, mask)
    if not isinstance(return_lse, bool):
        raise TypeError(f"`return_lse` must be a bool (got {type(return_lse).__name__})")
    if precision not in FP8_PRECISIONS:
        raise ValueError(f"`precision` must be one of {list(FP8_PRECISIONS)} for the FP8 simulation (got "
                         f"{precision!r}); use block_sparse_attention_ref for 'native'")
    scale = resolve_scale(scale, q.shape[-1])
    perm = None
    if order is not None:
        check_order_for(order, q.shape[2])
        perm = order.perm_on(q.device)
    quant = quantize_qk_fp8(q, k, mask.block, perm)
    qd = dequantize_fp8_blocks(quant.q8, quant.q_scale, mask.block)
    kd = dequantize_fp8_blocks(quant.k8, quant.k_scale, mask.block)
    if precision == "fp8_pv":
        out, lse = _attention_fp8_pv(qd, kd, *quantize_v_fp8(v, perm), mask, scale)
    else:
        vo = v if perm is None else v.index_select(2, perm)
        out, lse = block_sparse_attention_ref(qd, kd, vo.float(), mask, scale=scale, return_lse=True)
    if order is not None:
        inv = order.inv.to(q.device)
        out, lse = out.index_select(2, inv), lse.index_select(2, inv)
    out = out.to(q.dtype)
    return (out, lse + quant.lse_shift(q, scale)) if return_lse else out
