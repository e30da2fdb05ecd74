"""The DFSAttn attention processors that replace the stock ones of sparse self-attention layers.

Per sparse self-attention call a processor computes q, k, v exactly as the stock processor
does and then:

* dense plan (warm-up step): calls the original processor (stock SDPA; Wan with
  ``fused_ops`` fuses the q/k norm + RoPE first); under a ``precision`` ending in ``"_dense"``
  it attends with ``block_sparse_attention`` at that precision and every block kept instead (no
  order, nothing scored or cached);
* refresh (or no valid cached mask): scores the ordered q, k with
  ``dfsviz.kernels.block_scores``, selects top-k blocks with ``select_topk`` (per-head
  budgets of a calibrated plan: ``select_topk_heads``) and caches the mask for this layer;
  otherwise reuses the layer's cached mask;
* attends with ``dfsviz.kernels.block_sparse_attention`` (rows gathered through the token
  order and the output scattered back, unless permute-once already ordered the tokens), with FP8 Q and K under ``precision="fp8"`` or ``"fp8_dense"``, and FP8
  P . V too under ``"fp8_pv"`` or ``"fp8_pv_dense"``.

Processors (which one serves a layer: the registry entry's ``tuned`` map, by stock processor):

* :class:`WanDFSProcessor`: ``WanAttention`` self-attention (video only).
* :class:`HunyuanVideoDFSProcessor`: joint [video, text] attention in dual- and single-stream
  blocks, the text padded and masked by a boolean key mask. As DFSAttn's reference code does:
  key blocks from ``Nv // block`` on (the boundary block and the text) are forced inside
  the budget and those query blocks are dense. Padded text is cut off before the sparse
  kernel (it is masked out as keys anyway); padded query rows attend densely to the real
  keys, as stock SDPA does.
* :class:`CogVideoXDFSProcessor`: joint [text, video] attention; by analogy the text key
  blocks (up to and including the boundary block) are forced and their query rows are dense.
* :class:`SDPADFSProcessor`: every other family of the registry. It runs the stock processor
  and replaces the SDPA call it makes (the q, k, v the stock processor computed, [B, H, N, D]);
  text tokens are placed as the registry entry says, their count is N minus the video tokens.

Under diffusers' Ulysses context parallelism (``transformer.enable_parallelism``) a rank's
processor gets its shard of the sequence. The sparse attention still runs on the whole
sequence of the rank's heads (``heads``): the stock attention runs through diffusers'
dispatcher, whose all-to-alls gather the sequence and scatter the heads, and DFSAttn replaces
the SDPA call of the native backend between them (Wan: :class:`WanDFSProcessor` calls the
dispatcher itself; the SDPA-level processor gets this for free). A calibrated plan's per-head
budgets are sliced to the rank's heads.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F

from dfsviz.accel.config import DFSConfig
from dfsviz.accel.plan import select_topk_heads, text_blocks
from dfsviz.accel.state import DFSState, SparseCall, _CacheEntry, _CallContext
from dfsviz.kernels import block_scores, block_sparse_attention, block_stats
from dfsviz.kernels._dispatch import KERNEL_DTYPES
from dfsviz.kernels.qk_norm_rope import qk_norm_rope, wan_rope
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import TokenOrder, make_order
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_recall, oracle_recall

logger = logging.getLogger(__name__)

__all__ = [
    "CogVideoXDFSProcessor",
    "HunyuanVideoDFSProcessor",
    "PROCESSORS",
    "SDPADFSProcessor",
    "WanDFSProcessor",
]


class _DFSProcessorBase:
    """Shared sparse attention of the DFSAttn processors (per-arch q/k/v in subclasses)."""

    #: where text sits in the SDPA calls :meth:`_sdpa` replaces: before the video (True) or after it
    text_first = False

    def __init__(self, original, layer: int, state: DFSState, config: DFSConfig, cond_index: int,
                 heads: slice | None = None) -> None:
        self.original = original
        self.layer = layer
        self.state = state
        self.config = config
        self.cond_index = cond_index
        # Under diffusers' Ulysses attention this rank attends the heads `heads` of the layer.
        self.heads = heads
        # A calibrated plan gives every head its own budget; else the schedule's gamma serves all heads.
        gammas = None if config.calibration is None else config.calibration.gammas(layer)
        self.gammas = gammas if gammas is None or heads is None else gammas[heads]
        self.precision = config.kernel_precision

    def _dfs_ctx(self) -> _CallContext | None:
        """The call's context when DFSAttn computes this attention (a sparse step; under
        a ``precision`` ending in ``"_dense"`` a dense step too), else None: the stock attention serves."""
        ctx = self.state.current
        if ctx is None or (ctx.plan.dense and not self.config.dense_calls_through_kernel):
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
               key_mask: torch.Tensor | None = None, grid: LatentGrid | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Sparse attention of one call: q, k, v [B, H, N, D] in the call's token order -> [B, H, N, D].

        ``key_mask`` (bool, [B, 1, 1, N] or [B, N]) marks real keys; they must form a prefix
        (HunyuanVideo's padded text), whose length is the same for the whole batch. ``grid``:
        the sequence's grid when it is not the call's (text counted per SDPA call); ``scale``:
        the softmax scale (None = D**-0.5).
        """
        n = q.shape[2]
        grid = ctx.grid if grid is None else grid
        grid.check_tokens(n, argument="attention sequence length")
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
            if valid < grid.num_video or grid.text_first:
                raise ValueError(
                    f"DFSAttn layer {self.layer}: the key mask drops video tokens (real length {valid} < "
                    f"{grid.num_video} video tokens); only trailing text padding is supported"
                )
            ctx.key_masks[id(key_mask)] = (key_mask, valid)  # keeps the object alive, so the id stays unique
        if valid == n:
            return self._attend_prefix(q, k, v, ctx, grid, scale)
        sub = LatentGrid(grid.frames, grid.height, grid.width, text_len=valid - grid.num_video)
        out = torch.empty_like(q)
        out[:, :, :valid] = self._attend_prefix(q[:, :, :valid], k[:, :, :valid], v[:, :, :valid], ctx, sub, scale)
        # Padded query rows see the real keys only, exactly as the stock masked SDPA computes them.
        out[:, :, valid:] = F.scaled_dot_product_attention(q[:, :, valid:], k[:, :, :valid], v[:, :, :valid], scale=scale)
        return out

    def _attend_prefix(self, q, k, v, ctx: _CallContext, grid: LatentGrid, scale: float | None) -> torch.Tensor:
        cfg = self.config
        n = q.shape[2]
        if ctx.plan.dense:  # a "..._dense" warm-up: every block kept; nothing scored, cached or recorded
            full = BlockMask.full(q.shape[0], q.shape[1], n, cfg.block, device=q.device)
            self._observe(q, k, v, scale, full, grid, ordered=False, refresh=False)
            return block_sparse_attention(q, k, v, full, scale=scale, precision=self.precision, backend=cfg.backend)
        # Permute-once ordered the whole sequence with the full grid's order; text keeps its
        # place in every order, so the real prefix of the ordered sequence is ordered too.
        order = None if ctx.ordered else make_order(cfg.order, grid)
        mask, refreshed, entry = self._mask(q, k, ctx, grid, order, scale)
        self._observe(q, k, v, scale, mask, grid, ctx.ordered, refreshed)
        record = {
            "call": ctx.call, "step": ctx.step, "branch": ctx.branch, "transformer": ctx.transformer, "layer": self.layer,
            "gamma": ctx.plan.gamma if self.gammas is None else self.gammas, "refresh": refreshed,
            "density": entry.density, "seq_len": n,
        }
        if cfg.measure_recall:
            qo, ko = (q, k) if order is None else (order.apply(q), order.apply(k))
            stats = block_stats(qo, ko, block=cfg.block, scale=scale, backend=cfg.backend)
            record["recall"] = block_recall(stats.m, mask).cpu()
            # The best any mask with the same kept count per query block could do (scorer quality).
            record["oracle_recall"] = oracle_recall(stats, mask.kv_num_blocks.to(stats.m.device)).cpu()
        self.state.records.append(record)
        return block_sparse_attention(q, k, v, mask, order=order, scale=scale, precision=self.precision,
                                      backend=cfg.backend)

    def _observe(self, q, k, v, scale, mask: BlockMask, grid: LatentGrid, ordered: bool, refresh: bool) -> None:
        """Hand the call to the state's observers, q, k, v in the call's own token order
        (``ordered``: permute-once put them in the config's order of ``grid``, undone here).
        Without observers nothing is computed."""
        if not self.state.observers:
            return
        if ordered:
            order = make_order(self.config.order, grid)
            q, k, v = (order.restore(x) for x in (q, k, v))
        first_head = 0 if self.heads is None else self.heads.start
        call = SparseCall(self.layer, q, k, v, scale, mask, self.config.order, refresh, first_head)
        for observer in self.state.observers:
            observer(call)

    def _sdpa(self, ctx, calls: list, sdpa, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, **kwargs):
        """``torch.nn.functional.scaled_dot_product_attention`` while this layer's stock attention
        runs (:func:`_sdpa_replaced`): a self-attention call (queries and keys of one length) is
        :meth:`attend` on its q, k, v [B, H, N, D]; any other call is ``sdpa``'s. ``calls`` gets the
        length of every call replaced."""
        if query.shape[-2] != key.shape[-2] or kwargs.get("enable_gqa"):
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)
        if is_causal or dropout_p:
            raise ValueError(
                f"DFSAttn layer {self.layer}: a causal or dropout SDPA call (is_causal={is_causal}, dropout_p={dropout_p}) "
                "is not bidirectional video attention; put the model in eval mode or leave this layer dense"
            )
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(
                f"DFSAttn layer {self.layer}: got an additive {attn_mask.dtype} attention mask "
                f"{tuple(attn_mask.shape)}; the block-sparse kernel takes only boolean key-padding masks"
            )
        calls.append(query.shape[-2])
        video = ctx.grid.num_video
        text_len = query.shape[-2] - video
        if text_len < 0:
            raise ValueError(
                f"DFSAttn layer {self.layer}: self-attention over {query.shape[-2]} tokens, fewer than the "
                f"{video} video tokens of the grid {ctx.grid.name}; the latent does not match this layer"
            )
        g = ctx.grid
        grid = LatentGrid(g.frames, g.height, g.width, text_len=text_len, text_first=self.text_first and text_len > 0)
        return self.attend(query, key, value, ctx, attn_mask, grid, scale)

    def _through_sdpa(self, ctx: _CallContext, run, *args, **kwargs):
        """``run(*args, **kwargs)`` with the SDPA call of its self-attention replaced by
        :meth:`attend` (:meth:`_sdpa`); refused when no self-attention call reached SDPA."""
        calls = []
        with _sdpa_replaced(functools.partial(self._sdpa, ctx, calls)):
            out = run(*args, **kwargs)
        if not calls:
            raise ValueError(
                f"DFSAttn layer {self.layer}: the self-attention of {type(self.original).__name__} never reached torch "
                "SDPA (a flash/sage backend?); call set_attention_backend('native') on the transformer first"
            )
        return out

    def _mask(self, q, k, ctx: _CallContext, grid: LatentGrid, order: TokenOrder | None, scale: float | None):
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
            scores = block_scores(qs, ks, method=cfg.score_method, tile=cfg.tile, block=cfg.block, scale=scale,
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
    whole inner dim, and float32 tables [1, N, 1, D] of the head dim, a power of two. Anything
    else (e.g. diffusers' RMSNorm, which rounds twice) keeps the unfused path."""
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
        and t.shape[0] in (1, x.shape[0]) and t.shape[-1] * attn.heads == inner
        and t.shape[-1] & (t.shape[-1] - 1) == 0 for t in (cos, sin))


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
    processor's backend, as in the stock processor (the FP8 kernel under ``fp8_dense``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self._dfs_ctx()
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
        elif self.heads is not None:
            # Under diffusers' Ulysses attention q, k, v are this rank's shard of the sequence:
            # diffusers' all-to-all gives the rank the whole sequence of its heads, DFSAttn replaces
            # the SDPA call of the native backend on them, and the second all-to-all returns the
            # rank's tokens of every head.
            out = self._through_sdpa(ctx, _stock_attention, self.original, query, key, value, None)
        else:
            out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx).transpose(1, 2)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideoDFSProcessor(_DFSProcessorBase):
    """DFSAttn for HunyuanVideo joint attention ([video, text]; dual- and single-stream blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctx = self._dfs_ctx()
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
        ctx = self._dfs_ctx()
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


class SDPADFSProcessor(_DFSProcessorBase):
    """DFSAttn for any stock processor whose self-attention reaches SDPA (``native`` backend).

    The stock processor runs unchanged; while it runs, the SDPA call of its self-attention
    (queries and keys of one length) is replaced by :meth:`attend` on the very q, k, v it
    computed. Its text tokens ("before"/"after" the video, from the registry entry) are N minus
    the call's video tokens, so per-sample text lengths (Mochi) need no mask. A boolean
    key-padding mask is honoured as in HunyuanVideo; any other mask, causal or dropout SDPA
    call is refused."""

    def __init__(self, original, layer: int, state: DFSState, config: DFSConfig, cond_index: int,
                 heads: slice | None = None, text_first: bool = False) -> None:
        super().__init__(original, layer, state, config, cond_index, heads)
        self.text_first = text_first
        # diffusers' Attention.forward passes only the keyword arguments the processor's
        # ``__call__`` names (e.g. ``image_rotary_emb``): show it the stock processor's signature
        self.__call__ = functools.update_wrapper(functools.partial(type(self).__call__, self), original.__call__)

    def __call__(self, attn, *args, **kwargs):
        ctx = self._dfs_ctx()
        if ctx is None:
            return self.original(attn, *args, **kwargs)
        return self._through_sdpa(ctx, self.original, attn, *args, **kwargs)


@contextlib.contextmanager
def _sdpa_replaced(replacement):
    """``torch.nn.functional.scaled_dot_product_attention`` is ``replacement(original, ...)``
    inside the block (diffusers' ``native`` backend looks it up at every call)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = functools.partial(replacement, original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


#: processor key of a registry entry's ``tuned`` map -> DFSAttn processor class
PROCESSORS: dict[str, type] = {
    "wan": WanDFSProcessor,
    "hunyuanvideo": HunyuanVideoDFSProcessor,
    "cogvideox": CogVideoXDFSProcessor,
}
