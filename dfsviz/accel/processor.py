"""DFSAttn inside diffusers video transformers: attention processors, schedule state, undo.

``apply_dfsattn(pipe_or_transformer, DFSConfig(...))`` replaces the processor of every
sparse self-attention layer (the capture adapters pick the layers and number them) with
a DFSAttn processor and returns a :class:`DFSHandle`; ``handle.remove()`` (or leaving
``with apply_dfsattn(...)``) puts the original processor objects back, so outputs are
bit-identical to a model that was never touched.

Per transformer call a forward pre-hook on the transformer reads the latent shape (the
token grid, through the adapter), advances the :class:`DFSState` and fixes the
:class:`~dfsviz.sparse.schedule.StepPlan`. Per sparse self-attention call the processor
computes q, k, v exactly as the stock processor does and then:

* dense plan (warm-up step): calls the original processor (stock SDPA; Wan with
  ``fused_ops`` fuses the q/k norm + RoPE first);
* refresh (or no valid cached mask): scores the ordered q, k with
  ``dfsviz.kernels.block_scores``, selects top-k blocks with ``select_topk`` (per-head
  budgets of a calibrated plan: ``select_topk_heads``) and caches the mask for this layer;
  otherwise reuses the layer's cached mask;
* attends with ``dfsviz.kernels.block_sparse_attention`` (the kernel gathers rows
  through the token order and scatters the output back, unless permute-once already
  ordered the tokens).

Architectures (the self-attention sequence layouts of diffusers' transformers):

* Wan: ``blocks.N.attn1`` (video only); cross-attention ``attn2`` keeps its processor.
* HunyuanVideo: joint [video, text] attention in dual- and single-stream blocks, the text
  padded and masked by a boolean key mask. As DFSAttn's reference code does:
  key blocks from ``Nv // block`` on (the boundary block and the text) are forced inside
  the budget and those query blocks are dense. Padded text is cut off before the sparse
  kernel (it is masked out as keys anyway); padded query rows attend densely to the real
  keys, as stock SDPA does. The token refiner is not a selected layer.
* CogVideoX: joint [text, video] attention; by analogy the text key blocks (up to and
  including the boundary block) are forced and their query rows are dense.

Masks are cached per (layer, branch, sequence length) together with the refresh step they
belong to: a mask is reused until the schedule's next refresh step. CFG: a batch with an
even number of elements is [cond, uncond] halves (``DFSConfig.cond_index`` says which is
cond); with ``cfg="share"`` only the cond half is scored and both halves use its mask;
branches run as separate transformer calls are the calls of one step in order (cond
first), and the later calls reuse the first call's mask under "share".
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dfsviz.accel.config import DFSConfig
from dfsviz.accel.plan import select_topk_heads, text_blocks
from dfsviz.accel.wan_block import fused_block_forward
from dfsviz.capture.adapters import ModelAdapter, adapter_for
from dfsviz.kernels import block_scores, block_sparse_attention, block_stats
from dfsviz.kernels._dispatch import KERNEL_DTYPES
from dfsviz.kernels.qk_norm_rope import qk_norm_rope, wan_rope
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import TokenOrder, make_order
from dfsviz.sparse.schedule import DFSSchedule, StepPlan
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_recall, oracle_recall

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEL_ARCHS",
    "DFSHandle",
    "DFSState",
    "apply_dfsattn",
    "remove_dfsattn",
    "text_blocks",
]


# --------------------------------------------------------------------------- state
@dataclass
class _CacheEntry:
    epoch: int  # the refresh step this mask belongs to
    mask: BlockMask  # as scored (batch of the scored elements)
    density: float  # mean rho(S) over batch and heads
    expanded: dict = field(default_factory=dict)  # call batch size -> BlockMask for that batch


@dataclass
class _CallContext:
    call: int  # transformer calls before this one (since the state was created or reset)
    step: int
    branch: int  # index of this call within its step (0 = cond)
    plan: StepPlan
    grid: LatentGrid
    ordered: bool = False  # permute-once: tokens are in the DFS order right now
    order: TokenOrder | None = None
    permuted: dict = field(default_factory=dict)  # permute-once: id(original table) -> permuted table
    key_masks: dict = field(default_factory=dict)  # id(key mask) -> (mask, real length), checked once per call


class DFSState:
    """Schedule position, mask cache and per-call records of one :func:`apply_dfsattn`.

    The schedule position comes from either

    * counting transformer calls (default): call c of a video is step
      ``c // schedule.calls_per_step``, branch ``c % calls_per_step``; the counter wraps
      after ``num_steps * calls_per_step`` calls (a new video) and then drops the cache; or
    * an explicit step: ``state.set_step(i)`` before the transformer calls of step i (e.g.
      from a pipeline's ``callback_on_step_end``); the calls after it are branches 0, 1, ...

    Attributes:
        calls: transformer calls seen.
        step: the explicit step, or None when calls are counted.
        scorer_calls: masks computed (one per refreshed layer and branch).
        records: one dict per sparse attention call: call, step, branch, layer, gamma (the
            schedule's, or the tuple of per-head budgets of a calibrated plan, None = dense head),
            refresh (this call computed the mask), density (mean rho of the mask), and
            recall and oracle_recall (float64 [B, H] on the CPU: the mask's recall, and the best
            recall of any mask with the same kept count per query block) when
            ``DFSConfig.measure_recall``.
    """

    def __init__(self, schedule: DFSSchedule) -> None:
        if not isinstance(schedule, DFSSchedule):
            raise TypeError(f"`schedule` must be a DFSSchedule (got {type(schedule).__name__})")
        self.schedule = schedule
        self.reset()

    def reset(self) -> None:
        """Forget the position, the cached masks and the records (start of a new video)."""
        self.calls = 0
        self.step: int | None = None
        self._step_calls = 0
        self.scorer_calls = 0
        self.records: list[dict] = []
        self.masks: dict[tuple[int, int, int], _CacheEntry] = {}
        self.current: _CallContext | None = None

    def set_step(self, step: int) -> None:
        """Run the next transformer calls as diffusion step ``step`` in [0, num_steps)."""
        n = self.schedule.num_steps
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < n:
            raise ValueError(f"`step` must be an integer in [0, num_steps = {n}) (got {step!r})")
        self.step = step
        self._step_calls = 0

    def use_call_count(self) -> None:
        """Go back to counting transformer calls (drops the explicit step)."""
        self.step = None

    def _begin(self, grid: LatentGrid) -> _CallContext:
        sched = self.schedule
        if self.step is None:
            total = sched.num_steps * sched.calls_per_step
            c = self.calls % total
            if c == 0 and self.calls > 0:
                self.masks.clear()  # a new video: masks of the last one are stale
            step, branch = c // sched.calls_per_step, c % sched.calls_per_step
        else:
            step, branch = self.step, self._step_calls
            self._step_calls += 1
        ctx = _CallContext(self.calls, step, branch, sched.at_step(step), grid)
        self.calls += 1
        self.current = ctx
        return ctx

    def epoch(self, step: int) -> int:
        """The refresh step whose mask serves ``step``: the latest s <= step with a refresh."""
        for s in range(step, -1, -1):
            if self.schedule.at_step(s).refresh:
                return s
        raise ValueError(f"step {step} is dense under {self.schedule.name}; no mask serves it")


# --------------------------------------------------------------------------- processors
class _DFSProcessorBase:
    """Shared sparse attention of the DFSAttn processors (per-arch q/k/v in subclasses)."""

    def __init__(self, original, layer: int, state: DFSState, config: DFSConfig, cond_index: int) -> None:
        self.original = original
        self.layer = layer
        self.state = state
        self.config = config
        self.cond_index = cond_index
        # A calibrated plan gives every head its own budget; else the schedule's gamma serves all heads.
        self.gammas = None if config.calibration is None else config.calibration.gammas(layer)

    def _sparse_ctx(self) -> _CallContext | None:
        ctx = self.state.current
        if ctx is None or ctx.plan.dense:
            return None
        return ctx

    def _check_no_mask(self, attention_mask) -> None:
        if attention_mask is not None:
            raise ValueError(
                f"DFSAttn layer {self.layer}: this architecture's self-attention got an `attention_mask` "
                f"{tuple(attention_mask.shape)}; the block-sparse kernel supports no extra mask here. Remove the "
                "mask or call remove() on the DFSAttn handle"
            )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _CallContext,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse attention of one call: q, k, v [B, H, N, D] in the call's token order -> [B, H, N, D].

        ``key_mask`` (bool, [B, 1, 1, N] or [B, N]) marks real keys; they must form a prefix
        (HunyuanVideo's padded text), whose length is the same for the whole batch.
        """
        n = q.shape[2]
        ctx.grid.check_tokens(n, argument="attention sequence length")
        valid = n
        if key_mask is not None and id(key_mask) in ctx.key_masks:
            valid = ctx.key_masks[id(key_mask)][1]  # every layer of a call gets the same mask object
        elif key_mask is not None:
            keep = key_mask.reshape(key_mask.shape[0], -1)
            if keep.dtype != torch.bool or keep.shape[1] != n:
                raise ValueError(
                    f"DFSAttn layer {self.layer}: `attention_mask` must be a boolean key mask [B, 1, 1, {n}] "
                    f"(got {tuple(key_mask.shape)}, {key_mask.dtype})"
                )
            lengths = keep.sum(dim=1)
            prefix = torch.arange(n, device=keep.device)[None, :] < lengths[:, None]
            if not bool((prefix == keep).all()) or bool((lengths != lengths[0]).any()):
                raise ValueError(
                    f"DFSAttn layer {self.layer}: the key mask must keep one common prefix of the sequence for the "
                    f"whole batch (got real lengths {lengths.tolist()}); run prompts of different lengths "
                    "as separate transformer calls"
                )
            valid = int(lengths[0])
            if valid < ctx.grid.num_video or ctx.grid.text_first:
                raise ValueError(
                    f"DFSAttn layer {self.layer}: the key mask drops video tokens (real length {valid} < "
                    f"{ctx.grid.num_video} video tokens); only trailing text padding is supported"
                )
            ctx.key_masks[id(key_mask)] = (key_mask, valid)  # keeps the object alive, so the id stays unique
        if valid == n:
            return self._attend_prefix(q, k, v, ctx, ctx.grid)
        grid = LatentGrid(ctx.grid.frames, ctx.grid.height, ctx.grid.width, text_len=valid - ctx.grid.num_video)
        out = torch.empty_like(q)
        out[:, :, :valid] = self._attend_prefix(q[:, :, :valid], k[:, :, :valid], v[:, :, :valid], ctx, grid)
        # Padded query rows see the real keys only, exactly as the stock masked SDPA computes them.
        out[:, :, valid:] = F.scaled_dot_product_attention(q[:, :, valid:], k[:, :, :valid], v[:, :, :valid])
        return out

    def _attend_prefix(self, q, k, v, ctx: _CallContext, grid: LatentGrid) -> torch.Tensor:
        cfg = self.config
        n = q.shape[2]
        # Permute-once ordered the whole sequence with the full grid's order; text keeps its
        # place in every order, so the real prefix of the ordered sequence is ordered too.
        order = None if ctx.ordered else make_order(cfg.order, grid)
        mask, refreshed, entry = self._mask(q, k, ctx, grid, order)
        record = {
            "call": ctx.call, "step": ctx.step, "branch": ctx.branch, "layer": self.layer,
            "gamma": ctx.plan.gamma if self.gammas is None else self.gammas, "refresh": refreshed,
            "density": entry.density, "seq_len": n,
        }
        if cfg.measure_recall:
            qo, ko = (q, k) if order is None else (order.apply(q), order.apply(k))
            stats = block_stats(qo, ko, block=cfg.block, backend=cfg.backend)
            record["recall"] = block_recall(stats.m, mask).cpu()
            # The best any mask with the same kept count per query block could do (scorer quality).
            record["oracle_recall"] = oracle_recall(stats, mask.kv_num_blocks.to(stats.m.device)).cpu()
        self.state.records.append(record)
        return block_sparse_attention(q, k, v, mask, order=order, backend=cfg.backend)

    def _mask(self, q, k, ctx: _CallContext, grid: LatentGrid, order: TokenOrder | None):
        cfg, state = self.config, self.state
        bsz, n = q.shape[0], q.shape[2]
        share = cfg.cfg == "share"
        pairs = share and bsz % 2 == 0
        branch = 0 if share else ctx.branch
        key = (self.layer, branch, n)
        epoch = state.epoch(ctx.step)
        scored_batch = bsz // 2 if pairs else bsz
        entry = state.masks.get(key)
        refresh = ctx.plan.refresh and (ctx.branch == 0 or not share)
        fits = entry is not None and entry.epoch == epoch and entry.mask.shape[0] in (scored_batch, 1)
        if refresh or not fits:
            if not refresh:
                logger.info("DFSAttn layer %d: no cached mask for step %d branch %d (N=%d); scoring now",
                            self.layer, ctx.step, ctx.branch, n)
            if pairs:
                half = slice(self.cond_index * scored_batch, (self.cond_index + 1) * scored_batch)
                qs, ks = q[half], k[half]
            else:
                qs, ks = q, k
            if order is not None:
                qs, ks = order.apply(qs), order.apply(ks)
            scores = block_scores(qs, ks, method=cfg.score_method, tile=cfg.tile, block=cfg.block,
                                  backend=cfg.backend)
            forced = text_blocks(grid, n, cfg.block)
            if self.gammas is None:
                mask = select_topk(scores, ctx.plan.gamma, seq_len=n, block=cfg.block,
                                   forced_kv=forced or None, dense_q=forced or None)
            else:
                mask = select_topk_heads(scores, self.gammas, seq_len=n, block=cfg.block,
                                         forced_kv=forced or None, dense_q=forced or None)
            entry = _CacheEntry(epoch, mask, float(mask.density().mean()))
            state.masks[key] = entry
            state.scorer_calls += 1
            refreshed = True
        else:
            refreshed = False
        return self._expand(entry, bsz), refreshed, entry

    @staticmethod
    def _expand(entry: _CacheEntry, bsz: int) -> BlockMask:
        mask = entry.mask
        if mask.shape[0] == bsz:
            return mask
        if bsz not in entry.expanded:
            reps = bsz // mask.shape[0]
            entry.expanded[bsz] = BlockMask(
                mask.kv_num_blocks.repeat(reps, 1, 1), mask.kv_indices.repeat(reps, 1, 1, 1), mask.seq_len, mask.block
            )
        return entry.expanded[bsz]


def _fused_qk_norm_rope(attn, x: torch.Tensor, rotary_emb) -> bool:
    """True when Wan's q/k norm + RoPE of the hidden states x [B, N, C] can run as one
    ``qk_norm_rope`` pass: torch.nn.RMSNorm with an elementwise weight (in x's dtype) over the
    whole inner dim, and float32 tables [1, N, 1, D] of the head dim. Anything else (e.g.
    diffusers' RMSNorm, which rounds twice) keeps the unfused path."""
    projection = attn.to_qkv if attn.fused_projections else attn.to_q
    if rotary_emb is None or x.dtype not in KERNEL_DTYPES or projection.weight.dtype != x.dtype:
        return False
    norms = (attn.norm_q, attn.norm_k)
    if not all(isinstance(norm, torch.nn.RMSNorm) and norm.weight is not None and norm.weight.dtype == x.dtype
               and len(norm.normalized_shape) == 1 for norm in norms):
        return False
    inner = attn.norm_q.normalized_shape[0]
    cos, sin = rotary_emb
    return attn.norm_k.normalized_shape[0] == inner and all(
        t.dim() == 4 and t.dtype == torch.float32 and t.shape[1] == x.shape[1] and t.shape[2] == 1
        and t.shape[0] in (1, x.shape[0]) and t.shape[-1] * attn.heads == inner for t in (cos, sin))


@functools.cache
def _dispatcher() -> tuple:
    """diffusers' ``dispatch_attention_fn`` and whether it takes ``parallel_config`` (diffusers > 0.35)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn, "parallel_config" in inspect.signature(dispatch_attention_fn).parameters


def _stock_attention(stock, query, key, value, attention_mask) -> torch.Tensor:
    """Dense attention as the stock Wan processor ``stock`` runs it: diffusers' dispatcher with the
    processor's backend (and context-parallel config, on diffusers versions that have one)."""
    dispatch_attention_fn, parallel = _dispatcher()
    extra = {"parallel_config": getattr(stock, "_parallel_config", None)} if parallel else {}
    return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                 backend=getattr(stock, "_attention_backend", None), **extra)


class WanDFSProcessor(_DFSProcessorBase):
    """DFSAttn for ``WanAttention`` self-attention (``blocks.N.attn1``).

    Dense calls (warm-up steps) keep the stock processor unless ``config.fused_ops`` fuses the
    q/k norm + RoPE; their attention is then diffusers' ``dispatch_attention_fn`` with the stock
    processor's backend, as in the stock processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self._sparse_ctx()
        fused = self.config.fused_ops and _fused_qk_norm_rope(attn, hidden_states, rotary_emb)
        if encoder_hidden_states is not None or (ctx is None and not fused):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if ctx is not None:
            self._check_no_mask(attention_mask)
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if fused:
            # One pass per tensor (Triton on CUDA): RMSNorm over the inner dim, then Wan's RoPE.
            backend = self.config.backend
            query = qk_norm_rope(query, attn.norm_q.weight, attn.norm_q.eps, *rotary_emb, backend=backend)
            key = qk_norm_rope(key, attn.norm_k.weight, attn.norm_k.eps, *rotary_emb, backend=backend)
            query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        else:
            query, key = attn.norm_q(query), attn.norm_k(key)
            query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
            if rotary_emb is not None:
                query, key = wan_rope(query, *rotary_emb), wan_rope(key, *rotary_emb)
        if ctx is None:
            out = _stock_attention(self.original, query, key, value, attention_mask)
        else:
            out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx).transpose(1, 2)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideoDFSProcessor(_DFSProcessorBase):
    """DFSAttn for HunyuanVideo joint attention ([video, text]; dual- and single-stream blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctx = self._sparse_ctx()
        if ctx is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        single = attn.add_q_proj is None
        text_len = encoder_hidden_states.shape[1]
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                   query[:, -text_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                 key[:, -text_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if not single:
            eq, ek, ev = (p(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx, attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class CogVideoXDFSProcessor(_DFSProcessorBase):
    """DFSAttn for CogVideoX joint attention ([text, video])."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        ctx = self._sparse_ctx()
        if ctx is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        self._check_no_mask(attention_mask)
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        bsz = hidden_states.shape[0]
        query, key, value = (p(hidden_states).view(bsz, -1, attn.heads, p.out_features // attn.heads).transpose(1, 2)
                             for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = self.attend(query, key, value, ctx)
        out = out.transpose(1, 2).reshape(bsz, -1, out.shape[1] * out.shape[3])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class _ArchSpec:
    """What DFSAttn needs beyond the capture adapter.

    Fields:
        processor: DFSAttn processor class.
        stock: class names of the stock processors it replaces (q/k/v computed identically).
        joint_text: the self-attention sequence holds the text (its length = text embeddings').
        cond_index: batch half of the conditional branch in the family's pipelines.
        blocks: attribute names of the block lists, in the order the model runs them.
        restore: module right after the block stack whose first input is the video hidden states.
        rotary: (block argument names, sequence dim of the rotary tables [.., Nv, .., D]).
        token_args: other block arguments with a per-token dim to permute: name -> (dim, ndim that has it).
        refuse: config values under which the blocks are not token-wise between attention calls
            (permute-once refuses them): config attribute -> value.
        fused_block: ``(block, backend) -> forward or None``: the block forward with fused ops
            (``DFSConfig.fused_ops``), None for a block it does not know.
    """

    processor: type
    stock: tuple[str, ...]
    joint_text: bool
    cond_index: int
    blocks: tuple[str, ...]
    restore: str
    rotary: tuple[tuple[str, ...], int]
    token_args: dict = field(default_factory=dict)
    refuse: dict = field(default_factory=dict)
    fused_block: object = None


ACCEL_ARCHS: dict[str, _ArchSpec] = {
    "wan": _ArchSpec(WanDFSProcessor, ("WanAttnProcessor",), False, 0, ("blocks",), "norm_out", (("rotary_emb",), 1),
                     token_args={"temb": (1, 4)},  # Wan 2.2 TI2V: per-token modulation [B, N, 6, C]
                     fused_block=fused_block_forward),
    "hunyuanvideo": _ArchSpec(HunyuanVideoDFSProcessor, ("HunyuanVideoAttnProcessor2_0",), True, 0,
                              ("transformer_blocks", "single_transformer_blocks"), "norm_out",
                              (("freqs_cis", "image_rotary_emb"), 0),
                              # I2V token replace modulates the first frame's tokens apart: not token-wise
                              refuse={"image_condition_type": "token_replace"}),
    "cogvideox": _ArchSpec(CogVideoXDFSProcessor, ("CogVideoXAttnProcessor2_0",), True, 1,
                           ("transformer_blocks",), "norm_final", (("image_rotary_emb",), 0)),
}


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(module.forward).bind(*args, **kwargs)


# --------------------------------------------------------------------------- handle
class DFSHandle:
    """What :func:`apply_dfsattn` installed; ``remove()`` undoes it exactly (idempotent).

    Attributes:
        transformer: the patched transformer.
        config: the :class:`DFSConfig`.
        state: the :class:`DFSState` (schedule position, cache, records; set steps here).
        layers: qualified name -> layer index of every self-attention layer the adapter selects.
        sparse_layers: names of the layers whose processors were replaced.
        fused_blocks: (block, fused forward) of each block running its fused forward
            (``DFSConfig.fused_ops``).
    """

    def __init__(self, transformer, config: DFSConfig, adapter: ModelAdapter, spec: _ArchSpec) -> None:
        self.transformer = transformer
        self.config = config
        self.adapter = adapter
        self.spec = spec
        self.state = DFSState(config.schedule)
        self.layers = adapter.select_layers(transformer)
        self.sparse_layers: list[str] = []
        self.fused_blocks: list[tuple[torch.nn.Module, object]] = []
        self._originals: dict[str, object] = {}
        self._hooks: list = []
        self.active = False

    # -- install ------------------------------------------------------------------------
    def _install(self) -> None:
        cfg, spec, model = self.config, self.spec, self.transformer
        modules = dict(model.named_modules())
        bad = [i for i in cfg.schedule.dense_layers if i >= len(self.layers)]
        if bad:
            raise ValueError(
                f"`schedule.dense_layers` {list(cfg.schedule.dense_layers)} has indices {bad} >= the "
                f"{len(self.layers)} self-attention layers of this {type(model).__name__}; use indices in "
                f"[0, {len(self.layers)})"
            )
        for name, layer in self.layers.items():
            proc = modules[name].processor
            if isinstance(proc, _DFSProcessorBase):
                raise ValueError(
                    f"DFSAttn is already applied to {type(model).__name__} ({name}); call remove() on the first "
                    "handle before applying it again"
                )
            if type(proc).__name__ not in spec.stock:
                raise ValueError(
                    f"layer {name} has processor {type(proc).__name__}; DFSAttn replaces only {list(spec.stock)} "
                    f"(the stock processor of this architecture); reset it with set_default_attn_processor() or "
                    "the model's default"
                )
        cond = spec.cond_index if cfg.cond_index is None else cfg.cond_index
        if cfg.permute_once:
            self._check_permute_once(modules)
        plan = cfg.calibration
        if plan is not None:
            self._check_plan(plan, modules)
        for name, layer in self.layers.items():
            if cfg.schedule.layer_is_dense(layer) or (plan is not None and plan.gammas(layer) is None):
                continue
            module = modules[name]
            self._originals[name] = module.processor
            module.processor = spec.processor(module.processor, layer, self.state, cfg, cond)
            self.sparse_layers.append(name)
        if cfg.fused_ops and spec.fused_block is not None:
            for block in self._blocks():
                # A forward already set on the instance (diffusers or accelerate hooks: offloading,
                # block caches) stays in charge of its block: that block keeps its stock forward.
                forward = None if "forward" in vars(block) else spec.fused_block(block, cfg.backend)
                if forward is not None:
                    block.forward = forward  # an instance attribute; remove() deletes it
                    self.fused_blocks.append((block, forward))
        self._hooks.append(model.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._end_call))
        if cfg.permute_once:
            # Every block gets the hook: the model passes its rotary tables (and per-token
            # modulation) to each block anew, while the hidden states flow from block to block.
            for block in self._blocks():
                self._hooks.append(block.register_forward_pre_hook(self._permute, with_kwargs=True))
            self._hooks.append(modules[spec.restore].register_forward_pre_hook(self._restore, with_kwargs=True))
        self.active = True

    def _check_plan(self, plan, modules: dict) -> None:
        """Refuse a calibrated plan made for another model, or whose layers or heads this model lacks."""
        why = plan.model.mismatch(self.transformer)
        if why is not None:
            raise ValueError(f"DFSAttn config {why}; calibrate on a capture of this model")
        names = {layer: name for name, layer in self.layers.items()}
        for lb in plan.layers:
            name = names.get(lb.layer)
            if name is None:
                raise ValueError(
                    f"DFSAttn config layer {lb.layer} ({lb.name}) is not a self-attention layer of "
                    f"{type(self.transformer).__name__} (layers 0..{len(self.layers) - 1}); calibrate on a capture of "
                    "this model"
                )
            heads = getattr(modules[name], "heads", len(lb.gamma))
            if heads != len(lb.gamma):
                raise ValueError(
                    f"DFSAttn config layer {lb.layer} has budgets for {len(lb.gamma)} heads; {name} has {heads} "
                    "heads: calibrate on a capture of all heads of this model"
                )

    def _blocks(self) -> list[torch.nn.Module]:
        blocks = [b for attr in self.spec.blocks for b in (getattr(self.transformer, attr, None) or ())]
        if not blocks:
            raise ValueError(f"{type(self.transformer).__name__} has no transformer blocks in {self.spec.blocks}")
        return blocks

    def _check_permute_once(self, modules: dict) -> None:
        if self.spec.restore not in modules:
            raise ValueError(
                f"permute_once needs the module {self.spec.restore!r} after the block stack of "
                f"{type(self.transformer).__name__} to restore the token order; use permute_once=False"
            )
        self._blocks()  # raises before anything is installed
        for attr, value in self.spec.refuse.items():
            if getattr(self.transformer.config, attr, None) == value:
                raise ValueError(
                    f"permute_once is not valid for {type(self.transformer).__name__} with {attr}={value!r}: its "
                    "blocks treat the first frame's tokens apart, so they are not token-wise between attention "
                    "calls; use permute_once=False"
                )

    # -- hooks --------------------------------------------------------------------------
    def _begin_call(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        hidden = bound.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 5:
            raise ValueError(
                f"DFSAttn: {type(module).__name__} was called without a 5-D `hidden_states` latent "
                f"(got {type(hidden).__name__}); the token grid comes from its shape"
            )
        shape = tuple(hidden.shape)
        latent = shape[2:5] if self.adapter.channels_first else (shape[1], shape[3], shape[4])
        text_len = 0
        if self.spec.joint_text:
            text = bound.get("encoder_hidden_states")
            text_len = int(text.shape[1]) if isinstance(text, torch.Tensor) else 0
        grid = self.adapter.token_grid(module.config, latent, text_len)
        plan = self.config.calibration
        why = None if plan is None else plan.grid_mismatch(grid)
        if why is not None:
            raise ValueError(f"DFSAttn config {why}")
        self.state._begin(grid)
        return None

    def _end_call(self, module, args, output):
        ctx = self.state.current
        if ctx is not None and ctx.ordered:
            raise RuntimeError(
                f"DFSAttn permute_once: the token order was not restored before {type(module).__name__} returned "
                f"(module {self.spec.restore!r} never ran); outputs would be scrambled"
            )
        self.state.current = None
        return None

    def _permute(self, module, args, kwargs):
        ctx = self.state.current
        if ctx is None or ctx.plan.dense:  # dense attention gains nothing from the order
            return None
        bound = _bind(module, args, kwargs)
        if not ctx.ordered:  # first block of this call: order the hidden states once
            ctx.order = make_order(self.config.order, ctx.grid)
            perm = ctx.order.video_perm.to(bound.arguments["hidden_states"].device)
            bound.arguments["hidden_states"] = bound.arguments["hidden_states"].index_select(1, perm)
            ctx.ordered = True
        perm = ctx.order.video_perm

        def permuted(t: torch.Tensor, dim: int) -> torch.Tensor:
            if id(t) not in ctx.permuted:  # once per call; later blocks get the same tensor
                ctx.permuted[id(t)] = (t, t.index_select(dim, perm.to(t.device)))
            return ctx.permuted[id(t)][1]

        rot_names, rot_dim = self.spec.rotary
        for rot_name in rot_names:
            rot = bound.arguments.get(rot_name)
            if rot is not None:
                bound.arguments[rot_name] = tuple(permuted(t, rot_dim) for t in rot)
        for name, (dim, ndim) in self.spec.token_args.items():
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == ndim:
                bound.arguments[name] = permuted(value, dim)
        return bound.args, bound.kwargs

    def _restore(self, module, args, kwargs):
        ctx = self.state.current
        if ctx is None or not ctx.ordered:
            return None
        inv = torch.argsort(ctx.order.video_perm).to(args[0].device if args else kwargs["hidden_states"].device)
        if args:
            args = (args[0].index_select(1, inv), *args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].index_select(1, inv))
        ctx.ordered = False
        ctx.permuted.clear()
        return args, kwargs

    # -- pipelines ----------------------------------------------------------------------
    def step_callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """A diffusers ``callback_on_step_end``: the calls after step ``step_index`` are step + 1.

        Use with ``handle.state.set_step(0)`` before the pipeline call, so that every transformer
        call of a step (cond and uncond, however the pipeline batches them) gets that step's plan
        whatever ``schedule.calls_per_step`` says. Returns ``callback_kwargs`` unchanged.
        """
        if step_index + 1 < self.state.schedule.num_steps:
            self.state.set_step(step_index + 1)
        return callback_kwargs

    # -- undo ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Put every original processor object back and remove the hooks (safe to call twice)."""
        modules = dict(self.transformer.named_modules())
        for name, proc in self._originals.items():
            modules[name].processor = proc
        self._originals.clear()
        for block, forward in self.fused_blocks:
            if vars(block).get("forward") is forward:  # a hook installed later keeps its wrapper
                del block.forward
        self.fused_blocks.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.state.current = None
        self.active = False

    def __enter__(self) -> "DFSHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"DFSHandle({type(self.transformer).__name__}, {len(self.sparse_layers)}/{len(self.layers)} sparse "
                f"layers, {self.config.name}, active={self.active})")


def _transformer_of(obj) -> torch.nn.Module:
    if isinstance(obj, torch.nn.Module) and hasattr(obj, "config"):
        return obj
    inner = getattr(obj, "transformer", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TypeError(
        f"`pipe_or_transformer` must be a diffusers video transformer or a pipeline with a `.transformer` "
        f"(got {type(obj).__name__})"
    )


def apply_dfsattn(pipe_or_transformer, config: DFSConfig | str | os.PathLike | None = None) -> DFSHandle:
    """Run DFSAttn in the self-attention of a diffusers Wan, HunyuanVideo or CogVideoX transformer.

    Args:
        pipe_or_transformer: the transformer, or a pipeline whose ``.transformer`` it is.
        config: :class:`DFSConfig` (default: the paper's settings), or the path of a calibrated
            config file (``dfsviz calibrate``; read with :meth:`DFSConfig.load`). Set
            ``schedule.calls_per_step = 2`` for pipelines that run the CFG branches as two
            transformer calls per step (diffusers' WanPipeline) when steps are counted
            (``DFSConfig.load(path, calls_per_step=2)``), or drive steps with ``handle.step_callback``.

    Returns:
        A :class:`DFSHandle`: ``.remove()`` restores the original processors (also as a
        context manager); ``.state`` holds the schedule position, mask cache and records.

    Raises:
        TypeError / ValueError: unsupported object or architecture, processors that are not
        the stock ones, DFSAttn already applied, dense layers out of range, a calibrated config
        made for another model (or, at the first call, another latent grid).
    """
    config = DFSConfig() if config is None else config
    if isinstance(config, (str, os.PathLike)):
        config = DFSConfig.load(config)
    if not isinstance(config, DFSConfig):
        raise TypeError(
            f"`config` must be a DFSConfig or the path of a calibrated config file (got {type(config).__name__})"
        )
    model = _transformer_of(pipe_or_transformer)
    adapter = adapter_for(model)
    if adapter.name not in ACCEL_ARCHS:
        raise ValueError(
            f"DFSAttn supports {sorted(ACCEL_ARCHS)} transformers (got adapter {adapter.name!r} for "
            f"{type(model).__name__})"
        )
    handle = DFSHandle(model, config, adapter, ACCEL_ARCHS[adapter.name])
    try:
        handle._install()
    except Exception:
        handle.remove()  # leave the model as it was
        raise
    logger.info("DFSAttn on %s: %d sparse of %d self-attention layers (%s)", type(model).__name__,
                len(handle.sparse_layers), len(handle.layers), config.name)
    return handle


def remove_dfsattn(handle: DFSHandle) -> None:
    """Undo :func:`apply_dfsattn` (same as ``handle.remove()``)."""
    if not isinstance(handle, DFSHandle):
        raise TypeError(f"`handle` must be the DFSHandle apply_dfsattn returned (got {type(handle).__name__})")
    handle.remove()
