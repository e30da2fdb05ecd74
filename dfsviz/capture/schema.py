"""The capture file's schema (format version 1): names, dims, dtypes, root attributes.

This module alone says what a capture file holds; ``docs/format.md`` documents it for
people. The writer (:mod:`dfsviz.capture.writer`) builds files from it and the reader checks
files against it (:mod:`dfsviz.capture.validation`), so a file that does not match is refused
with one line naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from dfsviz.sparse.grid import LatentGrid

__all__ = [
    "CURVE_NAMES",
    "BRANCHES",
    "DIMS",
    "FILTERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RootAttrs",
    "SCORE_STATS",
    "STAT_NAMES",
    "STEP_GROUP",
    "UNITS",
    "VIDEO_GROUP",
    "VIDEO_MAX_FRAMES",
    "VIDEO_MAX_SIDE",
    "StoreLayout",
    "dataset_dtype",
    "dimension_values",
    "method_names",
    "read_json_attr",
    "root_datasets",
    "step_key",
]

FORMAT_NAME = "dfsviz-capture"
FORMAT_VERSION = 1
STEP_GROUP = "steps"
# Maps are deflated Huffman-only (Z_HUFFMAN_ONLY: no LZ77 match search): on shuffled float
# maps, whose mantissa bytes match search cannot shorten, it costs a fraction of level 1's
# CPU for files a few percent larger. The stream is standard zlib, so HDF5's gzip filter decodes
# it; GZIP_LEVEL is only the level the filter declares (the chunks are written
# precompressed, the filter never compresses).
GZIP_LEVEL = 1
STAT_NAMES = ("m", "L", "r", "J")
BRANCHES = ("cond", "uncond")
QKV_DTYPES = ("float16", "float32")
# storage dtypes of the maps (m, L, r, J, scores), widest first: root attribute `map_dtype`;
# files written before it existed hold float32 maps. uint8 maps hold 8-bit codes of each row,
# value = offset + scale x code, with (offset, scale) in the dataset `<name>_affine` beside them
# (dfsviz.capture.codes)
MAP_DTYPES = ("float32", "float16", "uint8")
# the setting `map_dtype`: "auto" takes the widest of MAP_DTYPES whose largest step fits `step_budget`
MAP_DTYPE_CHOICES = ("auto", *MAP_DTYPES)
MAP_NAMES = (*STAT_NAMES, "scores")
AFFINE_SUFFIX = "_affine"
# methods whose score is a block statistic the file stores anyway: meanpool's score is the pooled
# logit L, the oracle's the block mass m. `scores` holds the other methods (root attribute
# `score_methods`); files written before it existed hold every method there
SCORE_STATS = {"meanpool": "L", "oracle": "m"}
# Bounds a crafted file cannot exceed: reading more tokens than any video DiT has, or indices
# beyond what an int64 attribute round-trips, would only allocate memory for an attack.
MAX_TOKENS = 1 << 24
MAX_INDEX = 100_000
# HDF5 filters dfsviz writes (id -> name): shuffle and deflate; any other filter in a file is
# refused, so a crafted file cannot make HDF5 load a filter plugin
FILTERS = {1: "gzip", 2: "shuffle"}

# The decoded clip (optional root group `video`): frames uint8 [T, H, W, 3] and the latent grid
# frame of each, group attributes `fps` and `complete` (written last, as a step's). Clips are
# stored small: the longest side is scaled down to VIDEO_MAX_SIDE pixels (area average) and
# longer clips keep every k-th frame, k = ceil(T / VIDEO_MAX_FRAMES), with fps / k; enough for
# the dashboard to show which pixels a token covers, a few MB at most.
VIDEO_GROUP = "video"
VIDEO_MAX_SIDE = 256
VIDEO_MAX_FRAMES = 128
VIDEO_DIMS = {"frames": ("video_frame", "row", "column", "channel"), "latent_frame": ("video_frame",)}

# dims of every per-step dataset (the schema); docs/format.md mirrors this table
DIMS: dict[str, tuple[str, ...]] = {
    "m": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "L": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "r": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "J": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "scores": ("layer", "branch", "order", "method", "head", "q_block", "k_block"),
    "W_q": ("layer", "branch", "order", "head"),
    "W_k": ("layer", "branch", "order", "head"),
    "footprint_block": ("layer", "branch", "order", "head", "sample"),
    "footprint": ("layer", "branch", "order", "head", "sample", "token"),
    "q": ("qkv_layer", "branch", "head", "token", "dim"),
    "k": ("qkv_layer", "branch", "head", "token", "dim"),
    "v": ("qkv_layer", "branch", "head", "token", "dim"),
    "dfsattn_mask": ("layer", "branch", "head", "q_block", "k_block"),
    # recall of each method's top-k mask at k = 1..Mk key blocks per query block, of every method of
    # the file and the oracle (`recall_method`: StoreLayout.curve_methods)
    "recall": ("layer", "branch", "order", "recall_method", "head", "kept_blocks"),
    # ... and the density of the same masks (k / Mk but for a short last key block)
    "density": ("layer", "branch", "order", "recall_method", "head", "kept_blocks"),
}
#: the curves of the top-k masks of every budget that each step stores (layout.stored_recall)
CURVE_NAMES = ("recall", "density")
# uint8 maps: (offset, scale) of each map row
DIMS.update({f"{name}{AFFINE_SUFFIX}": (*DIMS[name][:-1], "affine") for name in MAP_NAMES})
AFFINE_TERMS = ("offset", "scale")
UNITS = {
    "m": "fraction of the query block's attention (rows sum to 1 over k_block)",
    "L": "logit (q . k * scale)",
    "r": "logit",
    "J": "logit (nats)",
    "scores": "method-specific (meanpool: logit; dfs_tile/antidiagonal/oracle: mass)",
    "W_q": "fraction of variance (0..1)",
    "W_k": "fraction of variance (0..1)",
    "footprint_block": "query block index in the order's block sequence",
    "footprint": "N x attention probability (1 = uniform over the N keys)",
    "q": "model units, post-norm post-RoPE",
    "k": "model units, post-norm post-RoPE",
    "v": "model units",
    "dfsattn_mask": "1 = key block attended by DFSAttn, 0 = skipped (blocks of the order dfsattn_order)",
    "recall": "fraction of the attention (0..1) the top-k mask of the method's scores keeps, k key blocks per query "
              "block (computed from the maps before their storage rounding)",
    "density": "fraction of the N x N token pairs (0..1) the same top-k mask keeps",
}
UNITS.update({f"{name}{AFFINE_SUFFIX}": f"(offset, scale) of each row of the uint8 {name}: value = offset + scale x code, "
              f"in the units of {name}" for name in MAP_NAMES})


def step_key(step: int) -> str:
    """Group name of a captured step, e.g. ``step_0007``."""
    return f"step_{step:04d}"


# the dtype and fill value of each per-step dataset besides the maps and Q/K/V (NaN = unwritten)
_DTYPES = {"footprint": ("float16", np.nan), "footprint_block": ("int32", -1), "W_q": ("float64", np.nan),
           "W_k": ("float64", np.nan), "dfsattn_mask": ("uint8", 255), "recall": ("float32", np.nan),
           "density": ("float32", np.nan)}


def dataset_dtype(name: str, layout: "StoreLayout") -> tuple[np.dtype, float | int]:
    """(dtype, fill value) of per-step dataset ``name``: maps (m, L, r, J, scores) are stored
    as ``layout.map_dtype``, Q/K/V as ``layout.qkv_dtype``."""
    if name in ("q", "k", "v"):
        return np.dtype(layout.qkv_dtype), np.nan
    if name in MAP_NAMES:
        # uint8 codes fill with 0: an unwritten map is told by its affine rows, NaN until written
        return np.dtype(layout.map_dtype), (0 if layout.map_dtype == "uint8" else np.nan)
    if name.endswith(AFFINE_SUFFIX):
        return np.dtype("float32"), np.nan
    dtype, fill = _DTYPES[name]
    return np.dtype(dtype), fill


def dimension_values(layout: "StoreLayout", dim: str) -> np.ndarray:
    """The coordinate (dimension scale) of ``dim`` in every step group: model layer and head
    indices, names of branches, orders and methods, the kept blocks k = 1..Mk, or 0..size-1."""
    names = {"branch": layout.branches, "order": layout.orders, "affine": AFFINE_TERMS, **method_names(layout)}
    if dim in names:
        import h5py

        return np.array(names[dim], dtype=h5py.string_dtype())
    indices = {"layer": layout.layers, "head": layout.heads, "qkv_layer": layout.qkv_layers}
    if dim in indices:
        return np.asarray(indices[dim], dtype=np.int64)
    first = 1 if dim == "kept_blocks" else 0
    return np.arange(first, first + layout.dim_size(dim), dtype=np.int64)


def method_names(layout: "StoreLayout") -> dict[str, tuple[str, ...]]:
    """The methods along each method dim: ``method`` (of ``scores``) holds ``score_methods``,
    ``recall_method`` (of ``recall`` and ``density``) ``curve_methods``."""
    return {"method": layout.score_methods, "recall_method": layout.curve_methods}


#: the root datasets and groups besides the step groups: name -> (dtype, shape from the layout)
def root_datasets(layout: "StoreLayout") -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``coords`` and every ``orders/<name>``: their dtypes and shapes."""
    out = {"coords": (np.dtype("int32"), (layout.grid.num_video, 3))}
    out.update({f"orders/{name}": (np.dtype("int64"), (layout.num_tokens,)) for name in layout.orders})
    return out


@dataclass(frozen=True)
class StoreLayout:
    """Everything that fixes the shapes of a capture file.

    Fields:
        grid: token grid of the self-attention sequence (N = grid.num_tokens, padding dropped).
        block: tokens per block (Mq = Mk = ceil(N / block)).
        orders: token order names, e.g. ("raster", "hilbert3d").
        methods: scoring method names.
        layers: captured layer indices (the adapter's integer numbering).
        layer_names: qualified module names, same length as ``layers``.
        heads: captured head indices of the model.
        branches: ("cond",) or ("cond", "uncond").
        steps: captured denoising step indices (0-based).
        footprints: sampled query blocks per head (0 = none).
        qkv_layers: layers whose Q/K/V are stored (subset of ``layers``).
        head_dim: D.
        qkv_dtype: numpy dtype name of stored Q/K/V ("float16" or "float32").
        map_dtype: numpy dtype name of stored m, L, r, J and scores ("float32", "float16" or
            "uint8": 8-bit codes of each row with its offset and scale in ``<name>_affine``; the
            reader returns float32 either way).
        qkv_steps: steps at which Q/K/V are stored (subset of ``steps``); None = every step.
        dfsattn_order: the token order of the masks DFSAttn used (``dfsviz.record`` of a
            pipeline with ``apply_dfsattn`` active: every step holds ``dfsattn_mask``, in the
            blocks of this order), or None.
        stored_scores: the methods whose scores the ``scores`` dataset holds (the order of its
            ``method`` dim), in the order of ``methods``, when not the default; None (the
            default, and what a list equal to it becomes) = every method without a statistic of
            its own (``SCORE_STATS``: meanpool's score is L, the oracle's m). Files written
            before this field hold every method. :attr:`score_methods` says which.
        stored_recall: every step holds ``recall`` and ``density``, the curves of the top-k masks of
            each method and the oracle (:attr:`curve_methods`) at k = 1..Mk, computed by the writer
            from the maps as the model produced them (root
            attribute ``stored_recall``; files written before it hold no curves: False).
    """

    grid: LatentGrid
    block: int
    orders: tuple[str, ...]
    methods: tuple[str, ...]
    layers: tuple[int, ...]
    layer_names: tuple[str, ...]
    heads: tuple[int, ...]
    branches: tuple[str, ...]
    steps: tuple[int, ...]
    footprints: int
    qkv_layers: tuple[int, ...] = ()
    head_dim: int = 64
    qkv_dtype: str = "float32"
    map_dtype: str = "float32"
    qkv_steps: tuple[int, ...] | None = None
    dfsattn_order: str | None = None
    stored_scores: tuple[str, ...] | None = None
    stored_recall: bool = True

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.layer_names):
            raise ValueError("`layer_names` must name every captured layer")
        missing = sorted(set(self.qkv_layers) - set(self.layers))
        if missing:
            raise ValueError(f"`qkv_layers` {missing} are not captured layers {list(self.layers)}")
        if self.qkv_dtype not in ("float16", "float32"):
            raise ValueError(f"`qkv_dtype` must be 'float16' or 'float32' (got {self.qkv_dtype!r})")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"`map_dtype` must be one of {list(MAP_DTYPES)} (got {self.map_dtype!r})")
        if self.qkv_steps is None:
            object.__setattr__(self, "qkv_steps", tuple(self.steps))
        extra = sorted(set(self.qkv_steps) - set(self.steps))
        if extra:
            raise ValueError(f"`qkv_steps` {extra} are not captured steps {list(self.steps)}")
        if self.dfsattn_order is not None and self.dfsattn_order not in self.orders:
            raise ValueError(f"`dfsattn_order` {self.dfsattn_order!r} is not a captured order {list(self.orders)}")
        if self.stored_scores is not None:
            stored, default = tuple(self.stored_scores), self._default_scores()
            if stored != tuple(m for m in self.methods if m in stored) or not set(default) <= set(stored):
                raise ValueError(
                    f"`stored_scores` {list(stored)} must list, in the order of `methods` {list(self.methods)}, every "
                    f"method besides {sorted(SCORE_STATS)} (whose scores are L and m)"
                )
            object.__setattr__(self, "stored_scores", None if stored == default else stored)

    def _default_scores(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m not in SCORE_STATS)

    @property
    def score_methods(self) -> tuple[str, ...]:
        """The methods whose scores the ``scores`` dataset holds (see ``stored_scores``)."""
        return self._default_scores() if self.stored_scores is None else self.stored_scores

    @property
    def num_tokens(self) -> int:
        return self.grid.num_tokens

    @property
    def num_blocks(self) -> int:
        return -(-self.grid.num_tokens // self.block)

    @property
    def curve_methods(self) -> tuple[str, ...]:
        """The methods whose top-k curves a step stores (``recall_method``): every method of the
        file, then the oracle (R*(k), the best any k blocks per row reach) when it is not one."""
        return self.methods if "oracle" in self.methods else (*self.methods, "oracle")

    def dim_size(self, dim: str) -> int:
        """Length of dimension ``dim`` (a name used in ``DIMS``)."""
        sizes = {
            "layer": len(self.layers),
            "branch": len(self.branches),
            "order": len(self.orders),
            "method": len(self.score_methods),
            "head": len(self.heads),
            "q_block": self.num_blocks,
            "k_block": self.num_blocks,
            "sample": self.footprints,
            "token": self.num_tokens,
            "qkv_layer": len(self.qkv_layers),
            "dim": self.head_dim,
            "affine": len(AFFINE_TERMS),
            "recall_method": len(self.curve_methods),
            "kept_blocks": self.num_blocks,
        }
        return sizes[dim]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a per-step dataset (see ``DIMS``)."""
        return tuple(self.dim_size(d) for d in DIMS[name])

    def has_qkv(self, step: int) -> bool:
        """Whether Q/K/V are stored at ``step``."""
        return bool(self.qkv_layers) and step in self.qkv_steps

    def datasets(self, step: int) -> list[str]:
        """Datasets present in the group of captured step ``step``."""
        names = list(STAT_NAMES) + ["W_q", "W_k"]
        if self.score_methods:
            names.append("scores")
        if self.map_dtype == "uint8":
            names += [f"{name}{AFFINE_SUFFIX}" for name in names if name in MAP_NAMES]
        if self.stored_recall and self.methods:
            names += CURVE_NAMES
        if self.footprints:
            names += ["footprint_block", "footprint"]
        if self.has_qkv(step):
            names += ["q", "k", "v"]
        if self.dfsattn_order is not None:
            names.append("dfsattn_mask")
        return names

    def bytes_per_step(self, step: int) -> int:
        """Uncompressed bytes of one step's datasets (an upper bound of the file growth)."""
        return sum(int(np.prod(self.shape(name), dtype=np.int64)) * dataset_dtype(name, self)[0].itemsize
                   for name in self.datasets(step))

    def total_bytes(self) -> int:
        """Uncompressed bytes of all captured steps (an upper bound of the file size)."""
        return sum(self.bytes_per_step(step) for step in self.steps)

    def to_attrs(self) -> dict:
        g = self.grid
        return {
            "grid": g.name,
            "grid_frames": g.frames,
            "grid_height": g.height,
            "grid_width": g.width,
            "text_len": g.text_len,
            "text_first": g.text_first,
            "num_tokens": g.num_tokens,
            "block": self.block,
            "num_blocks": self.num_blocks,
            "orders": list(self.orders),
            "methods": list(self.methods),
            "layers": np.asarray(self.layers, dtype=np.int64),
            "layer_names": list(self.layer_names),
            "heads": np.asarray(self.heads, dtype=np.int64),
            "branches": list(self.branches),
            "steps": np.asarray(self.steps, dtype=np.int64),
            "footprints": self.footprints,
            "qkv_layers": np.asarray(self.qkv_layers, dtype=np.int64),
            "head_dim": self.head_dim,
            "qkv_dtype": self.qkv_dtype,
            "map_dtype": self.map_dtype,
            "qkv_steps": np.asarray(self.qkv_steps, dtype=np.int64),
            "dfsattn_order": self.dfsattn_order or "",
            "score_methods": list(self.score_methods),
            "stored_recall": self.stored_recall,
        }

    @classmethod
    def from_attrs(cls, attrs) -> "StoreLayout":
        """The layout a file's root attributes describe.

        Raises ValueError naming the first attribute that is missing, of the wrong type or out
        of range, as a crafted or damaged file may have them.
        """
        from dfsviz.sparse._validate import check_block
        from dfsviz.sparse.orders import order_names
        from dfsviz.sparse.scoring import scorer_names

        read = RootAttrs(attrs)
        grid = LatentGrid(
            read.int("grid_frames", 1),
            read.int("grid_height", 1),
            read.int("grid_width", 1),
            text_len=read.int("text_len", 0),
            text_first=read.bool("text_first"),
        )
        if grid.num_tokens > MAX_TOKENS:
            raise ValueError(f"root attributes describe {grid.num_tokens} tokens, more than dfsviz reads ({MAX_TOKENS})")
        block = read.int("block", 1)
        try:
            check_block(block)
        except ValueError as exc:
            raise ValueError(f"root attribute {str(exc).replace('`block`', repr('block'), 1)}") from None
        qkv_steps = read.ints("qkv_steps", ascending=True) if "qkv_steps" in attrs else None
        # files written before `dfsattn_order` existed hold no DFSAttn masks, as "" says
        dfsattn = read.choice("dfsattn_order", ("", *order_names())) if "dfsattn_order" in attrs else ""
        try:
            methods = read.names("methods", scorer_names(), "method", allow_empty=True)
            return cls(
                grid=grid,
                block=block,
                orders=read.names("orders", order_names(), "order"),
                methods=methods,
                layers=read.ints("layers"),
                layer_names=read.strs("layer_names"),
                heads=read.ints("heads"),
                branches=read.names("branches", list(BRANCHES), "branch"),
                steps=read.ints("steps", ascending=True),
                footprints=read.int("footprints", 0),
                qkv_layers=read.ints("qkv_layers", allow_empty=True),
                head_dim=read.int("head_dim", 1),
                qkv_dtype=read.choice("qkv_dtype", QKV_DTYPES),
                # files written before `map_dtype` existed hold float32 maps
                map_dtype=read.choice("map_dtype", MAP_DTYPES) if "map_dtype" in attrs else "float32",
                # ... and every method's scores, meanpool's and the oracle's included
                stored_scores=(read.names("score_methods", scorer_names(), "method", allow_empty=True)
                               if "score_methods" in attrs else methods),
                # Files written before `qkv_steps` existed stored Q/K/V at every step.
                qkv_steps=qkv_steps,
                # ... and files written before `stored_recall` hold no recall curves
                stored_recall=read.bool("stored_recall") if "stored_recall" in attrs else False,
                dfsattn_order=dfsattn or None,
            )
        except ValueError as exc:
            raise ValueError(f"root attributes do not describe a capture: {exc}") from None


class RootAttrs:
    """Typed, checked reads of root attributes (h5py hands back numpy scalars and arrays)."""

    def __init__(self, attrs) -> None:
        self.attrs = attrs

    def get(self, name: str):
        if name not in self.attrs:
            raise ValueError(f"root attribute {name!r} is missing")
        return self.attrs[name]

    def int(self, name: str, low: int) -> int:
        value = self.get(name)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"root attribute {name!r} must be an integer (got {_show(value)})")
        if value < low:
            raise ValueError(f"root attribute {name!r} must be an integer >= {low} (got {int(value)})")
        return int(value)

    def bool(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"root attribute {name!r} must be a bool (got {_show(value)})")
        return bool(value)

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = _text(self.get(name))
        if value not in allowed:
            raise ValueError(f"root attribute {name!r} must be one of {list(allowed)} (got {_show(value)})")
        return value

    def _list(self, name: str):
        value = np.asarray(self.get(name))
        if value.ndim > 1:
            raise ValueError(f"root attribute {name!r} must be a list (got an array of shape {value.shape})")
        return np.atleast_1d(value)

    def ints(self, name: str, *, ascending: bool = False, allow_empty: bool = False) -> tuple[int, ...]:
        value = self._list(name)
        if not np.issubdtype(value.dtype, np.integer) and not (allow_empty and value.size == 0):
            raise ValueError(f"root attribute {name!r} must be a list of integers (got {_show(value)})")
        out = tuple(int(v) for v in value)
        if not out and not allow_empty:
            raise ValueError(f"root attribute {name!r} must not be empty")
        if any(v < 0 or v > MAX_INDEX for v in out):
            raise ValueError(f"root attribute {name!r} must hold integers in [0, {MAX_INDEX}] (got {list(out)})")
        if len(set(out)) != len(out):
            raise ValueError(f"root attribute {name!r} lists a value twice (got {list(out)})")
        if ascending and list(out) != sorted(out):
            raise ValueError(f"root attribute {name!r} must be ascending (got {list(out)})")
        return out

    def strs(self, name: str) -> tuple[str, ...]:
        value = self._list(name)
        out = tuple(_text(v) for v in value)
        if not all(isinstance(v, str) for v in out):
            raise ValueError(f"root attribute {name!r} must be a list of strings (got {_show(value)})")
        return out

    def names(self, name: str, allowed: list[str], what: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        value = self._list(name)
        out = tuple(_text(v) for v in value) if value.size else ()
        if not out and not allow_empty:
            raise ValueError(f"root attribute {name!r} must not be empty")
        for v in out:
            # names become HDF5 paths (orders/<name>): only registry names are safe
            if v not in allowed:
                raise ValueError(f"root attribute {name!r} has unknown {what} {_show(v)}; known: {allowed}")
        if len(set(out)) != len(out):
            raise ValueError(f"root attribute {name!r} lists a value twice (got {list(out)})")
        return out


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _show(value) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json_attr(attrs, name: str) -> dict:
    """A root attribute holding a JSON object (``capture_config``), checked."""
    value = RootAttrs(attrs).get(name)
    try:
        parsed = json.loads(_text(value))
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"root attribute {name!r} is not a JSON object (got {_show(value)})")
    return parsed
