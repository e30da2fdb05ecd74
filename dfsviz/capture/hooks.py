"""Record the post-RoPE Q, K (and V) of self-attention layers at the SDPA call.

diffusers computes attention in two ways (diffusers 0.42): some
processors call ``torch.nn.functional.scaled_dot_product_attention`` directly
(CogVideoX), the others go through ``dispatch_attention_fn`` whose ``native``
backend calls the same function. Both reach SDPA with Q and K already normed and
rotated, in layout [B, H, N, D], together with the real mask and scale. So the one
mechanism that covers every model is:

1. forward pre/post hooks on the chosen attention modules set "the layer running now";
2. ``F.scaled_dot_product_attention`` is wrapped for the duration of the capture;
   the wrapper calls the original with the very same arguments (outputs stay
   bit-identical) and hands the inputs of calls made inside a chosen layer to a
   callback.

Flash/sage/xformers backends bypass SDPA, so the capture forces diffusers' ``native``
backend while it is active and restores every processor's backend afterwards.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AttentionRecord", "AttentionCapture"]

logger = logging.getLogger(__name__)

# The layer whose forward is running; a ContextVar so nested or concurrent models do not mix.
_CURRENT_LAYER: contextvars.ContextVar[tuple[int, "AttentionCapture"] | None] = contextvars.ContextVar(
    "dfsviz_capture_layer", default=None
)


@dataclass(frozen=True)
class AttentionRecord:
    """The inputs of one SDPA call made inside a captured layer.

    Fields:
        layer: integer layer index the adapter gave the module.
        name: the module's qualified name, e.g. ``blocks.3.attn1``.
        q, k, v: [B, H, N, D] (k, v: [B, H, Nk, D]) exactly as passed to SDPA, detached,
            post-norm and post-RoPE, in the model's dtype and device.
        attn_mask: the mask passed to SDPA (bool key mask [B, 1, 1, N] for HunyuanVideo) or None.
        scale: the softmax scale passed to SDPA, or None for D**-0.5.
        call: how many SDPA calls this layer made before this one in the same forward
            (0 for every model handled here; Mochi-style per-sample loops give 0, 1, ...).
        dfsattn_mask: where DFSAttn computed this attention instead of SDPA
            (:func:`hand_over_sparse_call`), the :class:`~dfsviz.sparse.masks.BlockMask` it
            attended, [B, H, Mq, Mk]; None for an SDPA call (dense).
    """

    layer: int
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float | None
    call: int
    dfsattn_mask: object = None

    @property
    def is_self_attention(self) -> bool:
        """True when queries and keys come from the same sequence (N == Nk)."""
        return self.q.shape[-2] == self.k.shape[-2]

    @property
    def softmax_scale(self) -> float:
        """The scale SDPA applied: ``scale`` or D**-0.5."""
        return float(self.scale) if self.scale is not None else self.q.shape[-1] ** -0.5


class AttentionCapture:
    """Context manager that hands every SDPA call of the chosen layers to ``on_record``.

    Args:
        model: the diffusers transformer (any ``torch.nn.Module``).
        layers: qualified module name -> integer layer index, e.g.
            ``{"blocks.0.attn1": 0}`` (adapters build it). Every name must be a module of
            ``model``.
        on_record: called synchronously with an :class:`AttentionRecord` inside the forward,
            so its Q/K can be reduced and dropped before the next layer runs (bounded memory).
        force_native: force diffusers' ``native`` attention backend while active (needed
            on GPU, where flash backends bypass SDPA); every processor's backend and the
            registry's active backend are restored on exit.

    ``enabled`` can be switched off inside the context (e.g. for the unconditional pass)
    without removing hooks. Outputs are bit-identical with and without the capture: the
    wrapper passes its arguments unchanged to the original SDPA.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Mapping[str, int],
        on_record: Callable[[AttentionRecord], None],
        *,
        force_native: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module (got {type(model).__name__})")
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(
                f"`layers` must be a non-empty mapping of module name -> layer index (got {layers!r}); "
                "build it with an adapter's select_layers()"
            )
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(
                f"`layers` names modules the model does not have: {missing[:5]}; "
                f"attention modules found: {[n for n, m in modules.items() if hasattr(m, 'processor')][:8]}"
            )
        if not callable(on_record):
            raise TypeError(f"`on_record` must be callable (got {type(on_record).__name__})")
        self.model = model
        self.layers = dict(layers)
        self.on_record = on_record
        self.force_native = force_native
        self.enabled = True
        self._modules = {name: modules[name] for name in self.layers}
        self._names = {index: name for name, index in self.layers.items()}
        if len(self._names) != len(self.layers):
            raise ValueError(f"`layers` must give every module its own index (got {self.layers})")
        self._handles: list = []
        self._orig_sdpa = None
        self._calls: dict[int, int] = {}
        self._saved_backends: list[tuple[object, object]] | None = None
        self._saved_active = None

    # -- SDPA wrapper ----------------------------------------------------------------------
    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        out = self._orig_sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )
        current = _CURRENT_LAYER.get()
        if current is not None and current[1] is self:
            self._hand_over(current[0], query, key, value, attn_mask, scale)
        return out

    def _hand_over(self, layer: int, query, key, value, attn_mask, scale, dfsattn_mask=None) -> None:
        if not self.enabled:
            return
        call = self._calls.get(layer, 0)
        self._calls[layer] = call + 1
        self.on_record(
            AttentionRecord(
                layer=layer,
                name=self._names[layer],
                q=query.detach(),
                k=key.detach(),
                v=value.detach(),
                attn_mask=attn_mask,
                scale=scale,
                call=call,
                dfsattn_mask=dfsattn_mask,
            )
        )

    # -- hooks -----------------------------------------------------------------------------
    def _pre_hook(self, index: int):
        def hook(module, args):  # must return None: a value would replace the module's inputs
            self._tokens.append(_CURRENT_LAYER.set((index, self)))
            self._calls[index] = 0

        return hook

    def _post_hook(self, module, args, output):  # must return None: a value would replace the output
        if self._tokens:
            _CURRENT_LAYER.reset(self._tokens.pop())

    def _force_native_backend(self) -> None:
        try:
            from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
        except ImportError:  # not a diffusers model: nothing bypasses SDPA
            return
        processors = [m.processor for m in self.model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
        self._saved_backends = [(p, p._attention_backend) for p in processors]
        self._saved_active = _AttentionBackendRegistry._active_backend
        native = AttentionBackendName.NATIVE
        if all(b in (None, native) for _, b in self._saved_backends) and self._saved_active == native:
            return
        if hasattr(self.model, "set_attention_backend"):
            self.model.set_attention_backend("native")
        else:
            for p in processors:
                p._attention_backend = native
            _AttentionBackendRegistry.set_active_backend(native)

    def _restore_backend(self) -> None:
        if self._saved_backends is None:
            return
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        for processor, backend in self._saved_backends:
            processor._attention_backend = backend
        _AttentionBackendRegistry.set_active_backend(self._saved_active)
        self._saved_backends = None

    def __enter__(self) -> "AttentionCapture":
        if self._orig_sdpa is not None:
            raise RuntimeError("AttentionCapture is not re-entrant: leave the active `with` block first")
        self._tokens: list = []
        try:
            if self.force_native:
                self._force_native_backend()
            for name, index in self.layers.items():
                module = self._modules[name]
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(index)))
                self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))
            self._orig_sdpa = F.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = self._sdpa
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        try:
            if self._orig_sdpa is not None:
                torch.nn.functional.scaled_dot_product_attention = self._orig_sdpa
        finally:
            self._orig_sdpa = None
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._tokens = []
            self._restore_backend()

    def __exit__(self, *exc) -> None:
        self._restore()


def hand_over_sparse_call(call) -> None:
    """An observer for ``DFSState.observers``: the attention DFSAttn computed in place of SDPA
    (a :class:`~dfsviz.accel.state.SparseCall`) reaches the active capture of the layer running
    now as an :class:`AttentionRecord` with its mask, as an SDPA call would."""
    current = _CURRENT_LAYER.get()
    if current is not None:
        layer, capture = current
        capture._hand_over(layer, call.q, call.k, call.v, None, call.scale, dfsattn_mask=call.mask)
