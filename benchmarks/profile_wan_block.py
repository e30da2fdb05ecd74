"""Where one Wan2.1-14B block spends its time at 720p x 81 frames, stock and with DFSConfig.fused_ops (GPU).

    PYTHONPATH=$PWD python3 benchmarks/profile_wan_block.py --out benchmarks/results/profile_wan_block_<card>.json

One diffusers ``WanTransformerBlock`` (C = 5,120, 40 heads, FFN 13,824, cross_attn_norm) with
random bf16 weights, N = 75,600 video tokens, 512 text tokens, dense cuDNN attention. Times the
block call (bench_kernels.bench: the GPU's time, median of at least 10 calls) and lists
its CUDA kernels (torch.profiler, mean of 3 calls) grouped as attention (SDPA), matrix products, and
element-wise (everything else), for:

* stock: the block as diffusers runs it;
* fused: the forward of ``dfsviz.accel.wan_block`` (fused AdaLN norms and gated residuals) with
  the q/k norm + RoPE of self-attention as one ``qk_norm_rope`` pass per tensor, which is what
  ``DFSConfig.fused_ops`` runs in every call (here the attention stays dense).

Also the q (or k) prologue alone: torch.nn.RMSNorm + Wan's RoPE against ``qk_norm_rope``. This is
the profile behind the end-to-end "rest" of benchmarks/bench_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench  # noqa: E402
from provenance import run_header  # noqa: E402

from dfsviz.accel.wan_block import fused_block_forward  # noqa: E402
from dfsviz.kernels.qk_norm_rope import qk_norm_rope, wan_rope  # noqa: E402

DIM, HEADS, FFN, TOKENS, TEXT = 5120, 40, 13824, 75600, 512
LATENT = (16, 21, 90, 160)
GROUPS = (("attention", r"sdpa|fmha|flash|attention"), ("matmul", r"nvjet|gemm|xmma|cutlass|sm90_"))


class FusedQKProcessor:
    """WanAttnProcessor for self-attention with the fused q/k prologue (dense SDPA, as DFSAttn's dense calls)."""

    def __init__(self, stock) -> None:
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q = qk_norm_rope(attn.to_q(hidden_states), attn.norm_q.weight, attn.norm_q.eps, *rotary_emb)
        k = qk_norm_rope(attn.to_k(hidden_states), attn.norm_k.weight, attn.norm_k.eps, *rotary_emb)
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, attn.to_v(hidden_states)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def kernel_profile(fn, calls: int = 3) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total:
            per_kernel[ev.key] += ev.device_time_total / calls / 1e3
    groups = defaultdict(float)
    for name, ms in per_kernel.items():
        group = next((g for g, pattern in GROUPS if re.search(pattern, name, re.I)), "elementwise")
        groups[group] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:20]
    return {"groups_ms": dict(groups), "kernels_ms": [[name[:160], ms] for name, ms in top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU (the shapes are Wan2.1-14B at 720p)")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            block = WanTransformerBlock(DIM, FFN, HEADS, "rms_norm_across_heads", True, 1e-6).eval()
            rope = WanRotaryPosEmbed(DIM // HEADS, (1, 2, 2), 1024)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    x = torch.randn(1, TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, TEXT, DIM, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(1, 6, DIM, device="cuda", dtype=torch.bfloat16) * 0.1
    cos, sin = rope(torch.zeros(1, *LATENT, device="cuda"))

    result = {**run_header(torch.device("cuda")), "shape": {"N": TOKENS, "C": DIM, "heads": HEADS, "ffn": FFN,
                                                                 "text": TEXT, "dtype": "bfloat16"}}
    stock_processor = block.attn1.processor
    fused_forward = fused_block_forward(block, None)
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for name, forward, processor in (("stock", block.forward, stock_processor),
                                         ("fused", fused_forward, FusedQKProcessor(stock_processor))):
            block.attn1.processor = processor
            call = lambda: forward(x, text, temb, (cos, sin))  # noqa: E731
            result[name] = {"block_ms": bench(call, rep_ms=500), **kernel_profile(call)}
        block.attn1.processor = stock_processor
        norm = block.attn1.norm_q
        result["qk_prologue_ms"] = {
            "stock": bench(lambda: wan_rope(norm(x).unflatten(2, (HEADS, -1)), cos, sin), rep_ms=500),
            "fused": bench(lambda: qk_norm_rope(x, norm.weight, norm.eps, cos, sin), rep_ms=500),
        }
    result["block_speedup"] = result["stock"]["block_ms"] / result["fused"]["block_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in ("stock", "fused"):
        groups = ", ".join(f"{g} {ms:.1f}" for g, ms in sorted(result[name]["groups_ms"].items()))
        print(f"{name}: block {result[name]['block_ms']:.1f} ms ({groups} ms)")
    qk = result["qk_prologue_ms"]
    print(f"q/k prologue per tensor: stock {qk['stock']:.2f} ms, fused {qk['fused']:.2f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
