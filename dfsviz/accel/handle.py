"""``apply_dfsattn``: install DFSAttn in a diffusers video transformer, and the handle that undoes it.

``apply_dfsattn(pipe_or_transformer, DFSConfig(...))`` replaces the processor of every
sparse self-attention layer (the architecture registry, :mod:`dfsviz.architectures`, picks
the layers and numbers them) with a DFSAttn processor and returns a :class:`DFSHandle`;
``handle.remove()`` (or leaving ``with apply_dfsattn(...)``) puts the original processor
objects back, so outputs are bit-identical to a model that was never touched.

A pipeline with two transformers (Wan 2.2 A14B: ``transformer`` above the boundary timestep,
``transformer_2`` below) gets both replaced under one handle and one state, so the schedule
counts the steps of the whole run.

Per transformer call a forward pre-hook on the transformer reads the latent shape (the
token grid, through the registry entry), advances the :class:`~dfsviz.accel.state.DFSState`
and fixes the :class:`~dfsviz.sparse.schedule.StepPlan`. Permute-once orders the hidden
states (and the RoPE tables and per-token modulation the entry names) before the first
block and restores the order before the module after the block stack.

Under diffusers' Ulysses context parallelism (``transformer.enable_parallelism`` before
``apply_dfsattn``, launched by ``torchrun``) each rank's processors attend the whole sequence of
the rank's heads between diffusers' own all-to-alls (:mod:`dfsviz.accel.processors`); ring
attention, ``ulysses_anything``, tensor parallelism, a class without diffusers' context-parallel
plan, a Ulysses degree that does not divide the heads and permute-once are refused.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch

from dfsviz.accel.config import DFSConfig
from dfsviz.accel.fp8_linear import check_fp8_linears, fp8_linear_forward, fp8_linears
from dfsviz.accel.processors import PROCESSORS, SDPADFSProcessor, _DFSProcessorBase
from dfsviz.accel.state import DFSState
from dfsviz.architectures import PARALLEL_REFUSALS, Architecture, architecture_for, pipeline_transformers
from dfsviz.sparse.orders import make_order

logger = logging.getLogger(__name__)

__all__ = ["DFSHandle", "apply_dfsattn", "remove_dfsattn"]


def _timestep_value(value) -> float | None:
    """A transformer call's ``timestep`` as one number: the largest entry of a tensor (one per
    sample, or per token as in Wan 2.2 TI2V), a plain number as it is; None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().amax()) if value.numel() and not value.is_complex() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(module.forward).bind(*args, **kwargs)


class DFSHandle:
    """What :func:`apply_dfsattn` installed; ``remove()`` undoes it exactly (idempotent).

    Attributes:
        transformer: the patched transformer.
        config: the :class:`DFSConfig`.
        state: the :class:`DFSState` (schedule position, cache, records; set steps here).
        arch: the registry entry of the transformer's family.
        layers: qualified name -> layer index of every self-attention layer the entry selects.
        sparse_layers: names of the layers whose processors were replaced.
        fused_blocks: (block, fused forward) of each block running its fused forward
            (``DFSConfig.fused_ops``).
        fp8_linears: (linear, FP8 forward) of each linear layer of the blocks that runs FP8
            matrix products (``DFSConfig.linear_precision``).
        index: which of the pipeline's transformers this is (0: ``transformer``, 1:
            ``transformer_2``), as the records name it.
        transformer_2: the handle of the pipeline's ``transformer_2`` (same config and state;
            ``remove()`` undoes it too), or None.
        ulysses: (rank, degree) of this process in diffusers' Ulysses group when the transformer
            runs under context parallelism (the rank attends heads [rank * H / degree, (rank + 1)
            * H / degree) of every layer), else None.
    """

    def __init__(self, transformer, config: DFSConfig, arch: Architecture, state: DFSState | None = None,
                 index: int = 0) -> None:
        self.transformer = transformer
        self.config = config
        self.arch = arch
        self.state = DFSState(config.schedule) if state is None else state
        self.index = index
        self.transformer_2: DFSHandle | None = None
        self.layers = arch.select_layers(transformer)
        self.sparse_layers: list[str] = []
        self.fused_blocks: list[tuple[torch.nn.Module, object]] = []
        self.fp8_linears: list[tuple[torch.nn.Module, object]] = []
        self._originals: dict[str, object] = {}
        self._hooks: list = []
        self.active = False
        self._parallel_config = getattr(transformer, "_parallel_config", None)
        self.ulysses: tuple[int, int] | None = None

    # -- install ------------------------------------------------------------------------
    def _install(self) -> None:
        cfg, arch, model = self.config, self.arch, self.transformer
        modules = dict(model.named_modules())
        bad = [i for i in cfg.schedule.dense_layers if i >= len(self.layers)]
        if bad:
            raise ValueError(
                f"`schedule.dense_layers` {list(cfg.schedule.dense_layers)} has indices {bad} >= the "
                f"{len(self.layers)} self-attention layers of this {type(model).__name__}; use indices in "
                f"[0, {len(self.layers)})"
            )
        self.ulysses = self._ulysses_group(modules)
        for name, layer in self.layers.items():
            proc = modules[name].processor
            if isinstance(proc, _DFSProcessorBase):
                raise ValueError(
                    f"DFSAttn is already applied to {type(model).__name__} ({name}); call remove() on the first "
                    "handle before applying it again"
                )
            if type(proc).__name__ not in arch.stock:
                raise ValueError(
                    f"layer {name} has processor {type(proc).__name__}; DFSAttn replaces only {list(arch.stock)} "
                    f"(the stock processor of this architecture); reset it with set_default_attn_processor() or "
                    "the model's default"
                )
            # Under Ulysses attention Wan's processor, too, runs diffusers' dispatcher around DFSAttn.
            if type(proc).__name__ not in arch.tuned or self.ulysses is not None:
                backend = getattr(proc, "_attention_backend", None)
                if backend is not None and str(getattr(backend, "value", backend)) != "native":
                    raise ValueError(
                        f"layer {name} runs the {getattr(backend, 'value', backend)!r} attention backend, which bypasses "
                        "torch SDPA where DFSAttn replaces the attention; call set_attention_backend('native') first"
                    )
        cond = arch.cond_index if cfg.cond_index is None else cfg.cond_index
        if cfg.permute_once:
            self._check_permute_once(modules)
        plan = cfg.calibration
        if plan is not None:
            self._check_plan(plan, modules)
        linears = []
        if cfg.linear_precision != "native":
            blocks = self._blocks()
            linears = fp8_linears(blocks if cfg.linear_precision == "fp8_all" else blocks[1:-1])
            check_fp8_linears(linears, cfg.backend)
        for name, layer in self.layers.items():
            if cfg.schedule.layer_is_dense(layer) or (plan is not None and plan.gammas(layer) is None):
                continue
            module = modules[name]
            self._originals[name] = module.processor
            module.processor = self._processor(module.processor, layer, cond, self._rank_heads(module))
            self.sparse_layers.append(name)
        if cfg.fused_ops and arch.name == "wan":
            from dfsviz.accel.wan_block import fused_block_forward

            for block in self._blocks():
                # A forward already set on the instance (diffusers or accelerate hooks: offloading,
                # block caches) stays in charge of its block: that block keeps its stock forward.
                forward = None if "forward" in vars(block) else fused_block_forward(block, cfg.backend)
                if forward is not None:
                    block.forward = forward  # an instance attribute; remove() deletes it
                    self.fused_blocks.append((block, forward))
        for linear in linears:
            linear.forward = forward = fp8_linear_forward(linear, cfg.backend)
            self.fp8_linears.append((linear, forward))
        self._hooks.append(model.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._end_call))
        if cfg.permute_once:
            # Every block gets the hook: the model passes its rotary tables (and per-token
            # modulation) to each block anew, while the hidden states flow from block to block.
            for block in self._blocks():
                self._hooks.append(block.register_forward_pre_hook(self._permute, with_kwargs=True))
            self._hooks.append(modules[arch.restore].register_forward_pre_hook(self._restore, with_kwargs=True))
        self.active = True

    def _processor(self, original, layer: int, cond: int, heads: slice | None) -> _DFSProcessorBase:
        """The DFSAttn processor of a layer whose stock processor is ``original``."""
        key = self.arch.tuned.get(type(original).__name__)
        if key is not None:
            return PROCESSORS[key](original, layer, self.state, self.config, cond, heads)
        return SDPADFSProcessor(original, layer, self.state, self.config, cond, heads,
                                text_first=self.arch.text == "before")

    def _ulysses_group(self, modules: dict) -> tuple[int, int] | None:
        """(rank, degree) in diffusers' Ulysses group, None without parallelism; every other kind
        of diffusers parallelism, a class without diffusers' plan and a degree that does not divide
        the heads are refused."""
        parallel = self._parallel_config
        if parallel is None:
            return None
        name = type(self.transformer).__name__
        cp = getattr(parallel, "context_parallel_config", None)
        if cp is None:
            raise ValueError(f"DFSAttn under tensor parallelism ({name}): {PARALLEL_REFUSALS['tensor']}")
        if cp.ring_degree > 1:
            raise ValueError(
                f"DFSAttn under ring attention ({name}, ring_degree={cp.ring_degree}): {PARALLEL_REFUSALS['ring']}; "
                "use ContextParallelConfig(ulysses_degree=P)"
            )
        if cp.ulysses_anything:
            raise ValueError(f"DFSAttn under Ulysses attention ({name}): {PARALLEL_REFUSALS['ulysses_anything']}")
        if type(self.transformer)._cp_plan is None:
            raise ValueError(f"DFSAttn under context parallelism ({name}): {PARALLEL_REFUSALS['no_plan']}")
        if self.config.permute_once:
            raise ValueError(
                f"permute_once under context parallelism ({name}): diffusers splits the hidden states and the RoPE "
                "tables over the ranks in its own hooks and gathers the output after the last module, where the "
                "whole sequence cannot be reordered once; use permute_once=False (each call orders the whole "
                "sequence of its heads after the all-to-all: the same masks)"
            )
        degree = cp.ulysses_degree
        for layer_name in self.layers:
            heads = modules[layer_name].heads
            if heads % degree:
                raise ValueError(
                    f"DFSAttn under Ulysses attention: ulysses_degree={degree} does not divide the {heads} heads of "
                    f"{name} ({layer_name}); use a degree in "
                    f"{[d for d in range(1, heads + 1) if heads % d == 0]} (torchrun --nproc-per-node)"
                )
        return cp._ulysses_local_rank, degree

    def _rank_heads(self, module) -> slice | None:
        """The heads of the attention ``module`` this rank attends under Ulysses attention, or None."""
        if self.ulysses is None:
            return None
        rank, degree = self.ulysses
        per_rank = module.heads // degree
        return slice(rank * per_rank, (rank + 1) * per_rank)

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
        blocks = [b for attr in self.arch.blocks for b in (getattr(self.transformer, attr, None) or ())]
        if not blocks:
            raise ValueError(f"{type(self.transformer).__name__} has no transformer blocks in {self.arch.blocks}")
        return blocks

    def _check_permute_once(self, modules: dict) -> None:
        if self.arch.restore not in modules:
            raise ValueError(
                f"permute_once needs the module {self.arch.restore!r} after the block stack of "
                f"{type(self.transformer).__name__} to restore the token order; use permute_once=False"
            )
        self._blocks()  # raises before anything is installed
        if self.arch.permute_once is not None:
            raise ValueError(f"permute_once for {type(self.transformer).__name__}: {self.arch.permute_once}")
        for attr, value in self.arch.permute_refuse.items():
            if getattr(self.transformer.config, attr, None) == value:
                raise ValueError(
                    f"permute_once is not valid for {type(self.transformer).__name__} with {attr}={value!r}: its "
                    "blocks treat the first frame's tokens apart, so they are not token-wise between attention "
                    "calls; use permute_once=False"
                )

    # -- hooks --------------------------------------------------------------------------
    def _begin_call(self, module, args, kwargs):
        if getattr(module, "_parallel_config", None) is not self._parallel_config:
            raise RuntimeError(
                f"diffusers' parallelism of {type(module).__name__} changed after apply_dfsattn (enable_parallelism "
                "was called on it since); call remove() on the DFSAttn handle, then enable_parallelism, then "
                "apply_dfsattn"
            )
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        latent = self.arch.latent_of_call(bound.get("hidden_states"), bound)
        text_len = 0
        if self.arch.text != "none":
            # the text as the transformer got it, padding included (the SDPA-level processor
            # counts the text of each attention call itself)
            text = bound.get("encoder_hidden_states")
            text_len = int(text.shape[1]) if isinstance(text, torch.Tensor) else 0
        grid = self.arch.token_grid(module.config, latent, text_len)
        plan = self.config.calibration
        why = None if plan is None else plan.grid_mismatch(grid)
        if why is not None:
            raise ValueError(f"DFSAttn config {why}")
        # counted calls: the timestep tells a new video from steps past the schedule (one read per call)
        timestep = _timestep_value(bound.get("timestep")) if self.state.step is None else None
        self.state._begin(grid, self.index, timestep)
        return None

    def _end_call(self, module, args, output):
        ctx = self.state.current
        if ctx is not None and ctx.ordered:
            raise RuntimeError(
                f"DFSAttn permute_once: the token order was not restored before {type(module).__name__} returned "
                f"(module {self.arch.restore!r} never ran); outputs would be scrambled"
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

        rot_names, rot_dim = self.arch.rotary
        part = self.arch.rotary_part
        for rot_name in rot_names:
            rot = bound.arguments.get(rot_name)
            if rot is not None and part is None:
                bound.arguments[rot_name] = tuple(permuted(t, rot_dim) for t in rot)
            elif rot is not None:
                per_token = tuple(permuted(t, rot_dim) for t in rot[part])
                bound.arguments[rot_name] = (*rot[:part], per_token, *rot[part + 1:])
        for name, (dim, ndim) in self.arch.token_args.items():
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == ndim and value.shape[dim] == perm.numel():
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
        ValueError when the pipeline runs more steps than the schedule has (its later steps would
        all run as the schedule's last one).
        """
        n = self.state.schedule.num_steps
        if step_index + 1 < n:
            self.state.set_step(step_index + 1)
        elif step_index + 1 > n:
            raise ValueError(f"the pipeline runs more steps than the DFSAttn schedule's num_steps = {n} (step "
                             f"{step_index} ended): pass num_inference_steps={n}, or calibrate (or configure) "
                             "DFSAttn for this many steps")
        return callback_kwargs

    # -- undo ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Put every original processor object back and remove the hooks, in this transformer and
        ``transformer_2`` (safe to call twice)."""
        if self.transformer_2 is not None:
            self.transformer_2.remove()
        modules = dict(self.transformer.named_modules())
        for name, proc in self._originals.items():
            modules[name].processor = proc
        self._originals.clear()
        for block, forward in self.fused_blocks:
            if vars(block).get("forward") is forward:  # a hook installed later keeps its wrapper
                del block.forward
        self.fused_blocks.clear()
        for linear, forward in self.fp8_linears:
            if vars(linear).get("forward") is forward:
                del linear.forward
        self.fp8_linears.clear()
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
        second = "" if self.transformer_2 is None else f", transformer_2: {len(self.transformer_2.sparse_layers)} sparse"
        return (f"DFSHandle({type(self.transformer).__name__}, {len(self.sparse_layers)}/{len(self.layers)} sparse "
                f"layers{second}, {self.config.name}, active={self.active})")


def _install(model, config: DFSConfig, arch: Architecture, state: DFSState | None, index: int) -> DFSHandle:
    """A handle on one transformer, installed; a refused install leaves the model as it was."""
    handle = DFSHandle(model, config, arch, state, index)
    try:
        handle._install()
    except Exception:
        handle.remove()
        raise
    logger.info("DFSAttn on %s: %d sparse of %d self-attention layers (%s)", type(model).__name__,
                len(handle.sparse_layers), len(handle.layers), config.name)
    return handle


def apply_dfsattn(pipe_or_transformer, config: DFSConfig | str | os.PathLike | None = None) -> DFSHandle:
    """Run DFSAttn in the self-attention of a diffusers video transformer of the architecture
    registry (``docs/models.md`` lists the classes: Wan, HunyuanVideo, CogVideoX, LTX-Video, ...).

    Args:
        pipe_or_transformer: the transformer, or a pipeline whose ``.transformer`` it is; a
            Wan 2.2 A14B pipeline's ``transformer_2`` is accelerated too, under the same handle.
        config: :class:`DFSConfig` (default: the paper's settings), or the path of a calibrated
            config file (``dfsviz calibrate``; read with :meth:`DFSConfig.load`). Set
            ``schedule.calls_per_step = 2`` for pipelines that run the CFG branches as two
            transformer calls per step (diffusers' WanPipeline) when steps are counted
            (``DFSConfig.load(path, calls_per_step=2)``), or drive steps with ``handle.step_callback``.

    Returns:
        A :class:`DFSHandle`: ``.remove()`` restores the original processors (also as a
        context manager); ``.state`` holds the schedule position, mask cache and records.

    Raises:
        TypeError / ValueError: unsupported object or architecture (with the reason), a model
        under diffusers' parallelism other than Ulysses attention with the class's own plan (or a
        Ulysses degree that does not divide the heads, or with permute-once), processors that
        are not the stock ones, DFSAttn already applied, dense layers out of range, a calibrated
        config made for another model (or, at the first call, another latent grid).

    Several GPUs: call ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``
    first, on every rank of a ``torchrun --nproc-per-node P`` launch, then ``apply_dfsattn``;
    each rank's ``handle.state`` holds the masks and records of its own heads (``handle.ulysses``).
    """
    config = DFSConfig() if config is None else config
    if isinstance(config, (str, os.PathLike)):
        config = DFSConfig.load(config)
    if not isinstance(config, DFSConfig):
        raise TypeError(
            f"`config` must be a DFSConfig or the path of a calibrated config file (got {type(config).__name__})"
        )
    if isinstance(pipe_or_transformer, torch.nn.Module) and hasattr(pipe_or_transformer, "config"):
        models = {"transformer": pipe_or_transformer}
    else:
        models = pipeline_transformers(pipe_or_transformer)
    arch = architecture_for(next(iter(models.values())))
    for model in models.values():
        if arch.dfsattn is not None:
            raise ValueError(f"DFSAttn does not run in {type(model).__name__}: {arch.dfsattn}")
    if config.calibration is not None and len(models) > 1:
        raise ValueError(
            f"a calibrated config holds the budgets of one transformer; {type(pipe_or_transformer).__name__} has "
            f"{len(models)} ({', '.join(models)}): apply it to one of them, e.g. apply_dfsattn(pipe.transformer, path)"
        )
    handles: list[DFSHandle] = []
    try:
        for name, model in models.items():
            state = handles[0].state if handles else None  # one schedule position over the whole run
            handles.append(_install(model, config, arch, state, arch.pipeline_transformers.index(name)))
    except Exception:
        for handle in handles:
            handle.remove()
        raise
    handle, *second = handles
    handle.transformer_2 = second[0] if second else None
    return handle


def remove_dfsattn(handle: DFSHandle) -> None:
    """Undo :func:`apply_dfsattn` (same as ``handle.remove()``)."""
    if not isinstance(handle, DFSHandle):
        raise TypeError(f"`handle` must be the DFSHandle apply_dfsattn returned (got {type(handle).__name__})")
    handle.remove()
