"""A calibrated DFSAttn plan: the versioned JSON file ``dfsviz calibrate`` writes.

``DFSConfig.load("dfsattn.json")`` and ``apply_dfsattn(pipe, "dfsattn.json")`` read it
(:class:`CalibratedPlan`); ``docs/calibration.md`` documents every field. The plan fixes
what a calibration decided: the model and latent grid it was calibrated for, the token
order, block, scoring method and tile, the schedule (dense warm-up steps and refresh
interval), and a kept fraction gamma per (layer, head) (``None`` = the head keeps every key
block), with the predicted recall and density of every decision and the provenance.

This module imports only ``dfsviz.sparse``: the solver (``dfsviz.analysis.calibrate``)
writes plans and the DFSAttn processors read them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dfsviz.sparse._validate import check_block, check_power_of_two
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import order_names
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.scoring import scorer_names
from dfsviz.sparse.select import select_topk, topk_count

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "CalibratedPlan",
    "LayerBudget",
    "ModelIdentity",
    "check_replaceable",
    "gamma_for_count",
    "public_config",
    "select_topk_heads",
    "text_blocks",
]

PLAN_FORMAT = "dfsviz-dfsattn-config"
PLAN_VERSION = 1


# --------------------------------------------------------------------------- budgets
def gamma_for_count(k: int, num_kv_blocks: int) -> float:
    """The kept fraction gamma with ``max(1, int(gamma * Mk)) == k`` exactly: k / Mk, or the next
    float above it where the product rounds below k (15 / 22 * 22 < 15 would keep 14)."""
    if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
        raise ValueError(f"`num_kv_blocks` must be a positive integer Mk (got {num_kv_blocks!r})")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_kv_blocks:
        raise ValueError(f"`k` must be an integer in [1, Mk = {num_kv_blocks}] (got {k!r})")
    gamma = k / num_kv_blocks
    while topk_count(gamma, num_kv_blocks) < k:
        gamma = math.nextafter(gamma, 2.0)
    return gamma


def text_blocks(grid: LatentGrid, seq_len: int, block: int) -> list[int]:
    """Key blocks forced into every budget and query blocks kept dense, for a joint sequence.

    Text last (HunyuanVideo): blocks ``Nv // block`` .. end, the reference's
    ``dense_start_block`` rule (the boundary block with the last video tokens included).
    Text first (CogVideoX): blocks 0 .. ceil(T / block) - 1 (the boundary block included).
    No text: [].
    """
    m = -(-seq_len // block)
    if grid.text_len == 0:
        return []
    if grid.text_first:
        return list(range(0, min(m, -(-grid.text_len // block))))
    return list(range(grid.num_video // block, m))


def select_topk_heads(
    scores: torch.Tensor,
    gammas: Sequence[float | None],
    *,
    seq_len: int,
    block: int,
    forced_kv: torch.Tensor | Sequence[int] | None = None,
    dense_q: torch.Tensor | Sequence[int] | None = None,
) -> BlockMask:
    """``select_topk`` with one budget per head: head h keeps max(1, int(gammas[h] * Mk)) key blocks.

    Args:
        scores: float [B, H, Mq, Mk].
        gammas: H kept fractions in (0, 1]; None keeps every key block (a dense head).
        seq_len, block, forced_kv, dense_q: as :func:`dfsviz.sparse.select.select_topk`.

    Returns:
        BlockMask [B, H, Mq, Mk]; head h equals ``select_topk`` of that head alone at gammas[h]
        (heads sharing a budget are selected in one call).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"`scores` must be a torch.Tensor [B, H, Mq, Mk] (got {type(scores).__name__})")
    if scores.dim() != 4:
        raise ValueError(f"`scores` must have shape [B, H, Mq, Mk] (got {tuple(scores.shape)}); score with block_scores")
    gammas = tuple(gammas)
    heads = scores.shape[1]
    if len(gammas) != heads:
        raise ValueError(f"`gammas` must hold one budget per head ({heads}) (got {len(gammas)})")
    groups: dict[float, list[int]] = {}
    for h, g in enumerate(gammas):
        groups.setdefault(1.0 if g is None else g, []).append(h)
    if len(groups) == 1:
        return select_topk(scores, next(iter(groups)), seq_len=seq_len, block=block, forced_kv=forced_kv, dense_q=dense_q)
    counts = torch.empty(scores.shape[:3], dtype=torch.int32, device=scores.device)
    indices = torch.empty(scores.shape, dtype=torch.int32, device=scores.device)
    for gamma, idx in groups.items():
        sel = torch.tensor(idx, device=scores.device)
        part = select_topk(scores.index_select(1, sel), gamma, seq_len=seq_len, block=block,
                           forced_kv=forced_kv, dense_q=dense_q)
        counts[:, sel] = part.kv_num_blocks
        indices[:, sel] = part.kv_indices
    return BlockMask(counts, indices, seq_len, block)


# --------------------------------------------------------------------------- identity
def public_config(config: object) -> dict:
    """A diffusers model config as plain JSON values, without private keys (``_name_or_path``, ...)."""
    items = dict(config).items() if config is not None else ()
    return json.loads(json.dumps({k: v for k, v in items if not str(k).startswith("_")}, default=list))


@dataclass(frozen=True)
class ModelIdentity:
    """The transformer a plan was calibrated for.

    Fields:
        id: the capture's model id (hub id, local path or ``dfsviz-embedded:<name>``).
        cls: transformer class name, e.g. "WanTransformer3DModel".
        adapter: capture adapter name ("wan", "hunyuanvideo", "cogvideox", ...).
        config: the transformer's public diffusers config (architecture: layers, heads, dims).
    """

    id: str
    cls: str
    adapter: str
    config: dict = field(default_factory=dict)

    def mismatch(self, transformer) -> str | None:
        """None when ``transformer`` is this model's class and architecture, else why not (one line).

        Weights are not compared: another checkpoint of the same architecture passes.
        """
        name = type(transformer).__name__
        config = getattr(transformer, "config", None)
        label = (config.get("_name_or_path") if hasattr(config, "get") else None) or name
        this = name if label == name else f"{label} ({name})"  # a model built in code has no checkpoint path
        if name != self.cls:
            return f"calibrated for {self.id} ({self.cls}); this transformer is {this}"
        mine = public_config(config)
        diff = [k for k in sorted(set(mine) & set(self.config)) if mine[k] != self.config[k]]
        if diff:
            shown = ", ".join(f"{k} {self.config[k]!r} != {mine[k]!r}" for k in diff[:3])
            return f"calibrated for {self.id} ({self.cls}); this transformer is {this} with {shown}"
        return None


# --------------------------------------------------------------------------- plan
def _fraction_or_none(value: object) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1)


def _unit(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


@dataclass(frozen=True)
class LayerBudget:
    """The calibrated budgets of one self-attention layer (validated on construction).

    Fields:
        layer: layer index (the capture adapter's numbering, as ``DFSSchedule.dense_layers``).
        name: qualified module name, e.g. "blocks.3.attn1".
        gamma: per head, the kept fraction of key blocks in (0, 1], or None for a dense head.
        kept_blocks: per head, the kept key blocks per query block k = max(1, int(gamma * Mk))
            (Mk for a dense head).
        predicted_recall: per head, the predicted recall in [0, 1] (1 for a dense head).
        density: per head, the predicted density rho in [0, 1] (1 for a dense head).
        recall_by_clip: () or, per head, the predicted recall on each pooled capture (None where
            a capture holds no step of the sparse part of the schedule).
    """

    layer: int
    name: str
    gamma: tuple[float | None, ...]
    kept_blocks: tuple[int, ...]
    predicted_recall: tuple[float, ...]
    density: tuple[float, ...]
    recall_by_clip: tuple[tuple[float | None, ...], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"`layer` must be an integer >= 0 (got {self.layer!r})")
        if not isinstance(self.name, str):
            raise TypeError(f"`name` of layer {self.layer} must be a str (got {type(self.name).__name__})")
        gamma = tuple(self.gamma)
        if not gamma or not all(_fraction_or_none(g) for g in gamma):
            raise ValueError(f"`gamma` of layer {self.layer} must hold one kept fraction in (0, 1] or None "
                             f"(a dense head) per head (got {list(gamma)})")
        heads = len(gamma)
        object.__setattr__(self, "gamma", tuple(None if g is None else float(g) for g in gamma))
        kept = tuple(self.kept_blocks)
        if len(kept) != heads or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in kept):
            raise ValueError(f"`kept_blocks` of layer {self.layer} must hold {heads} positive integers (got {list(kept)})")
        object.__setattr__(self, "kept_blocks", kept)
        for name in ("predicted_recall", "density"):
            values = tuple(getattr(self, name))
            if len(values) != heads or not all(_unit(v) for v in values):
                raise ValueError(f"`{name}` of layer {self.layer} must hold {heads} numbers in [0, 1] (got {list(values)})")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        clips = tuple(tuple(r) for r in self.recall_by_clip)
        if len(clips) not in (0, heads) or any(not all(v is None or _unit(v) for v in r) for r in clips):
            raise ValueError(f"`recall_by_clip` of layer {self.layer} must be empty or hold, per head ({heads}), "
                             "numbers in [0, 1] or None")
        object.__setattr__(self, "recall_by_clip", clips)

    @property
    def dense(self) -> bool:
        """True when every head keeps every key block (the layer runs the stock processor)."""
        return all(g is None for g in self.gamma)


#: Larger files are not read to tell whether they are DFSAttn configs (configs are kilobytes).
_PLAN_BYTES_MAX = 64 << 20


def check_replaceable(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` is absent or a file holding a DFSAttn config (JSON whose
    ``format`` is ``PLAN_FORMAT``, however valid its contents), the only file
    :meth:`CalibratedPlan.save` replaces: a capture or a run set's manifest named by mistake is kept."""
    path = Path(path)
    if not path.exists():
        return
    try:
        data = (json.loads(path.read_text()) if path.is_file() and path.stat().st_size <= _PLAN_BYTES_MAX
                else None)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, dict) and data.get("format") == PLAN_FORMAT):
        raise ValueError(f"{str(path)!r} exists and is not a DFSAttn config (a capture, a run set's manifest, "
                         "another file?): it is kept; name another file")


@dataclass(frozen=True, eq=False)
class CalibratedPlan:
    """A calibrated DFSAttn configuration, the contents of ``dfsattn.json`` (validated on construction).

    Fields:
        model: :class:`ModelIdentity` of the calibrated transformer.
        grid: the latent token grid it was calibrated for (text length included).
        block: tokens per block (power of two in [16, 256]).
        order: token order name ("hilbert3d").
        method: block scoring method name ("dfs_tile").
        tile: the method's tile (dfs_tile) or stride (antidiagonal), None for meanpool.
        num_steps: denoising steps of the calibrated schedule (>= 1).
        warmup_steps: dense warm-up steps, in [0, num_steps) (``DFSSchedule.skip_steps``).
        interval: steps between mask refreshes (>= 1).
        layers: one :class:`LayerBudget` per calibrated layer, ascending; layers of the model
            missing here (not captured) run dense.
        predicted: summary predictions (JSON values; see docs/calibration.md).
        provenance: captures used, target, settings (JSON values).
        dfsviz_version: the dfsviz that wrote the plan.
        created_utc: ISO time of writing.
    """

    model: ModelIdentity
    grid: LatentGrid
    block: int
    order: str
    method: str
    tile: int | None
    num_steps: int
    warmup_steps: int
    interval: int
    layers: tuple[LayerBudget, ...]
    predicted: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    dfsviz_version: str = ""
    created_utc: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelIdentity):
            raise TypeError(f"`model` must be a ModelIdentity (got {type(self.model).__name__})")
        if not isinstance(self.grid, LatentGrid):
            raise TypeError(f"`grid` must be a LatentGrid (got {type(self.grid).__name__})")
        check_block(self.block)
        if self.order not in order_names():
            raise ValueError(f"`order` must be one of {order_names()} (got {self.order!r})")
        if self.method not in scorer_names():
            raise ValueError(f"`method` must be one of {scorer_names()} (got {self.method!r})")
        if self.tile is not None:
            check_power_of_two(self.tile, "tile", 1, self.block)
        # The schedule validates the step counts (and names the field of a bad one).
        DFSSchedule(num_steps=self.num_steps, skip_steps=self.warmup_steps, interval=self.interval)
        if self.warmup_steps >= self.num_steps:
            raise ValueError(f"`warmup_steps` must be in [0, num_steps = {self.num_steps}) (got {self.warmup_steps}); "
                             "a plan with no sparse step is no plan")
        layers = tuple(self.layers)
        if not layers or not all(isinstance(lb, LayerBudget) for lb in layers):
            raise ValueError("`layers` must hold at least one LayerBudget")
        indices = [lb.layer for lb in layers]
        if indices != sorted(set(indices)):
            raise ValueError(f"`layers` must have ascending distinct layer indices (got {indices})")
        object.__setattr__(self, "layers", layers)
        mk = self.num_kv_blocks
        for lb in layers:
            want = tuple(mk if g is None else topk_count(g, mk) for g in lb.gamma)
            if lb.kept_blocks != want:
                raise ValueError(f"`kept_blocks` of layer {lb.layer} must be max(1, int(gamma * Mk)) with Mk = {mk}: "
                                 f"{list(want)} (got {list(lb.kept_blocks)})")
        for name in ("predicted", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"`{name}` must be a dict of JSON values (got {type(getattr(self, name)).__name__})")

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_kv_blocks(self) -> int:
        """Mk = ceil(N / block) of the calibrated grid."""
        return -(-self.grid.num_tokens // self.block)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Calibrated layers whose every head is dense."""
        return tuple(lb.layer for lb in self.layers if lb.dense)

    def gammas(self, layer: int) -> tuple[float | None, ...] | None:
        """Per-head budgets of ``layer``; None when the plan leaves it dense (all heads dense, or not calibrated)."""
        for lb in self.layers:
            if lb.layer == layer:
                return None if lb.dense else lb.gamma
        return None

    def schedule(self, calls_per_step: int = 1) -> DFSSchedule:
        """The calibrated :class:`DFSSchedule`: per-head budgets replace its gamma0 (1.0); no decrement."""
        return DFSSchedule(num_steps=self.num_steps, skip_steps=self.warmup_steps, interval=self.interval,
                           gamma0=1.0, decrement=0.0, dense_layers=self.dense_layers, calls_per_step=calls_per_step)

    def grid_mismatch(self, grid: LatentGrid) -> str | None:
        """None when ``grid`` has the calibrated video grid and text placement, else why not (one line).

        The text length may differ (prompts pad differently): budgets are fractions of Mk.
        """
        mine = self.grid
        if (grid.frames, grid.height, grid.width) == (mine.frames, mine.height, mine.width) and (
                grid.text_first == mine.text_first or not (grid.text_len and mine.text_len)):
            return None
        return (f"calibrated for grid {mine.name} of {self.model.id}; this call's latent gives grid {grid.name}: "
                "calibrate on a capture at this resolution")

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The plan as JSON values, in the documented field order."""
        g = self.grid
        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_VERSION,
            "dfsviz_version": self.dfsviz_version,
            "created_utc": self.created_utc,
            "model": {"id": self.model.id, "class": self.model.cls, "adapter": self.model.adapter,
                      "config": self.model.config},
            "grid": {"name": g.name, "frames": g.frames, "height": g.height, "width": g.width,
                     "text_len": g.text_len, "text_first": g.text_first, "num_tokens": g.num_tokens},
            "block": self.block,
            "order": self.order,
            "method": self.method,
            "tile": self.tile,
            "schedule": {"num_steps": self.num_steps, "warmup_steps": self.warmup_steps, "interval": self.interval},
            "dense_layers": list(self.dense_layers),
            "layers": [
                {"layer": lb.layer, "name": lb.name, "gamma": list(lb.gamma), "kept_blocks": list(lb.kept_blocks),
                 "predicted_recall": list(lb.predicted_recall), "density": list(lb.density),
                 "recall_by_clip": [list(r) for r in lb.recall_by_clip]}
                for lb in self.layers
            ],
            "predicted": self.predicted,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: object, source: str = "<dict>") -> "CalibratedPlan":
        """Read and validate a plan from JSON values; errors name ``source`` and the field."""
        from dfsviz._version import __version__

        def fail(what: str) -> ValueError:
            return ValueError(f"DFSAttn config {source}: {what}")

        def need(obj: object, key: str, kind, where: str = ""):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if not isinstance(obj, dict) or key not in obj:
                raise fail(f"missing field {where}{key!r}; write the file with `dfsviz calibrate`")
            value = obj[key]
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise fail(f"field {where}{key!r} must be {names} (got {type(value).__name__} {value!r})")
            return value

        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise fail(f"not a DFSAttn config (no format={PLAN_FORMAT!r}); write one with `dfsviz calibrate`")
        version = data.get("format_version")
        if version != PLAN_VERSION:
            raise fail(f"has format version {version!r}, written by dfsviz {data.get('dfsviz_version', 'unknown')}; "
                       f"this dfsviz {__version__} reads version {PLAN_VERSION}: calibrate again with this dfsviz")
        model, g, sched = (need(data, k, dict) for k in ("model", "grid", "schedule"))
        layers = need(data, "layers", list)
        try:
            plan = cls(
                model=ModelIdentity(*(need(model, k, kind, "model.") for k, kind in
                                      (("id", str), ("class", str), ("adapter", str), ("config", dict)))),
                grid=LatentGrid(*(need(g, k, int, "grid.") for k in ("frames", "height", "width")),
                                text_len=need(g, "text_len", int, "grid."),
                                text_first=need(g, "text_first", bool, "grid.")),
                block=need(data, "block", int), order=need(data, "order", str), method=need(data, "method", str),
                tile=need(data, "tile", (int, type(None))),
                num_steps=need(sched, "num_steps", int, "schedule."),
                warmup_steps=need(sched, "warmup_steps", int, "schedule."),
                interval=need(sched, "interval", int, "schedule."),
                layers=tuple(
                    LayerBudget(need(e, "layer", int, f"layers[{i}]."), need(e, "name", str, f"layers[{i}]."),
                                *(need(e, k, list, f"layers[{i}].") for k in
                                  ("gamma", "kept_blocks", "predicted_recall", "density", "recall_by_clip")))
                    for i, e in enumerate(layers)),
                predicted=need(data, "predicted", dict), provenance=need(data, "provenance", dict),
                dfsviz_version=str(data.get("dfsviz_version", "")), created_utc=str(data.get("created_utc", "")),
            )
        except (ValueError, TypeError) as err:
            if str(err).startswith("DFSAttn config "):
                raise
            raise fail(str(err)) from None
        dense = need(data, "dense_layers", list)
        if dense != list(plan.dense_layers):
            raise fail(f"`dense_layers` {dense} must list the layers whose every gamma is null {list(plan.dense_layers)}")
        return plan

    # -- files ---------------------------------------------------------------------------------
    def dumps(self) -> str:
        """The config file's text: indented strict JSON (no NaN)."""
        return json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`dumps` to ``path``, whole or not at all (a temporary file beside it,
        renamed over it), and return the path. An existing file is replaced only when it is a
        DFSAttn config (:func:`check_replaceable`)."""
        path = Path(path)
        check_replaceable(path)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            tmp.write_text(self.dumps())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibratedPlan":
        """Read and validate ``path``; another format or version is refused with one line."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be the path of a DFSAttn config file (got {type(path).__name__})")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"DFSAttn config {str(path)!r} does not exist; write one with `dfsviz calibrate`")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"DFSAttn config {str(path)!r} is not JSON ({err}); write one with `dfsviz calibrate`") from None
        return cls.from_json(data, source=repr(str(path)))
