"""Checks of a capture file against its schema: structure when it is opened, content on demand.

* :func:`check_structure` (every :class:`~dfsviz.capture.reader.CaptureReader`, metadata only):
  only hard links; no external raw storage; virtual datasets only over files in the capture's
  own directory; only the filters dfsviz writes; every dataset of every completed step, the
  coordinates and the permutations present with the layout's shape, dtype and dims; a clip
  (``/video``) of bounded shape with its ``fps``. Raises ValueError with one line naming the
  first problem.
* :func:`map_problem` (the writer before it writes a map, and :func:`read_problem`): the
  values of one map are what its quantity allows (block mass rows sum to 1, finite logits,
  non-negative diversities ...).
* :func:`video_problem` (the writer before it stores a clip, the reader when it reads one, and
  :func:`header_problems`): each video frame names a latent frame of the grid, in order.
* Content (``CaptureReader.validate``, ``dfsviz inspect``), in two parts: :func:`header_problems`
  checks the permutations, the coordinates, the dimension scales and the clip's latent frames
  (no map read: cheap); :func:`iter_map_problems` checks every map of every completed step, one
  read at a time, so that a caller may stop between reads (the dashboard checks large files so,
  in the background). :func:`read_problem` checks the maps of one read, named by step, dataset
  and position; the dashboard checks each map a view reads with it too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dfsviz.capture.codes import decode
from dfsviz.capture.schema import (
    AFFINE_SUFFIX,
    CURVE_NAMES,
    DIMS,
    FILTERS,
    MAP_NAMES,
    STEP_GROUP,
    VIDEO_DIMS,
    VIDEO_GROUP,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_SIDE,
    StoreLayout,
    dataset_dtype,
    dimension_values,
    method_names,
    root_datasets,
    step_key,
)

__all__ = [
    "check_structure", "completed_video", "header_problems", "iter_map_problems", "map_problem", "read_problem",
    "video_problem",
]

# Block-mass rows are float32 sums of up to Mk probabilities: 1e-3 is far above their rounding
# and far below any real damage (a scaled or truncated map)
ROW_SUM_TOL = 1e-3
# r and J are >= 0 by definition; float32 streaming leaves them at worst a few ulps below
NEGATIVE_TOL = -1e-3


# ----------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------
def _check_links(group, skip: set[str]) -> None:
    """Every member of ``group`` (recursively) is a hard link to a safe object."""
    import h5py

    for name in group:
        path = f"{group.name.rstrip('/')}/{name}"
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise ValueError(f"{path!r} is an external link to {link.filename!r}: dfsviz captures hold no external links (refused)")
        if isinstance(link, h5py.SoftLink):
            raise ValueError(f"{path!r} is a soft link to {link.path!r}: dfsviz captures hold only hard links (refused)")
        if path in skip:
            continue
        obj = group[name]
        if isinstance(obj, h5py.Group):
            _check_links(obj, skip)
        else:
            _check_storage(obj)


def _check_storage(dset) -> None:
    """Data of ``dset`` lies in this file: dfsviz never writes external storage or virtual
    datasets, and either would make the reader open other files (a virtual dataset's source
    can be swapped, or replaced by a link out of the data root, after the file was checked)."""
    if dset.external:
        raise ValueError(
            f"{dset.name!r} stores its data in an external file ({dset.external[0][0]!r}): dfsviz captures keep their "
            "data inside the file (refused)"
        )
    if dset.is_virtual:
        raise ValueError(
            f"{dset.name!r} is a virtual dataset reading other files: dfsviz captures keep their data inside the file "
            "(refused)"
        )
    _check_filters(dset)


def _check_filters(dset) -> None:
    plist = dset.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(i)
        if code not in FILTERS:
            label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            raise ValueError(
                f"{dset.name!r} uses HDF5 filter {code} ({label}); dfsviz writes only shuffle and gzip (refused)"
            )


def _check_dataset(f, path: str, dtype: np.dtype, shape: tuple[int, ...], dims: tuple[str, ...] | None = None) -> None:
    import h5py

    if path.lstrip("/") not in f:
        raise ValueError(f"'/{path.lstrip('/')}' is missing")
    dset = f[path]
    where = f"'/{path.lstrip('/')}'"
    if not isinstance(dset, h5py.Dataset):
        raise ValueError(f"{where} must be a dataset (got a group)")
    if dset.dtype != dtype:
        raise ValueError(f"{where} has dtype {dset.dtype}, expected {dtype}")
    if dset.shape != shape:
        raise ValueError(f"{where} has shape {dset.shape}, expected {shape}")
    if dims is not None:
        stored = [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(dset.attrs.get("dims", []))]
        if stored != list(dims):
            raise ValueError(f"{where} has dims {stored}, expected {list(dims)}")


def completed_step_groups(f) -> dict[int, object]:
    """step -> group of every step marked complete; anything else under /steps is refused,
    except half-written groups of a step that never completed (ignored: resume drops them)."""
    import h5py

    if STEP_GROUP not in f or not isinstance(f[STEP_GROUP], h5py.Group):
        raise ValueError(f"'/{STEP_GROUP}' is missing")
    out = {}
    for name in f[STEP_GROUP]:
        where = f"'/{STEP_GROUP}/{name}'"
        if not name.startswith("step_") or not name[5:].isdigit():
            raise ValueError(f"{where} is not a step group (step_NNNN)")
        try:
            group = f[STEP_GROUP][name]
            complete = bool(group.attrs.get("complete", False))
        except (KeyError, OSError, RuntimeError):
            continue  # a step cut short by a crash: never complete, never read
        if not complete:
            continue
        step = group.attrs.get("step")
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step_key(int(step)) != name:
            shown = int(step) if isinstance(step, np.integer) else repr(step)
            raise ValueError(f"{where} has attribute step = {shown}, which does not match its name")
        out[int(step)] = group
    return out


def completed_video(f):
    """The ``/video`` group when the file holds a whole clip, else None (no clip, or one a crash
    cut short: ``complete`` is written last). Anything but a group there is refused."""
    import h5py

    if VIDEO_GROUP not in f:
        return None
    group = f[VIDEO_GROUP]
    if not isinstance(group, h5py.Group):
        raise ValueError(f"'/{VIDEO_GROUP}' must be a group (got a dataset)")
    try:
        complete = group.attrs.get("complete", False)
    except (KeyError, OSError, RuntimeError):
        return None
    return group if isinstance(complete, (bool, np.bool_)) and complete else None


def _check_video(f) -> None:
    group = completed_video(f)
    if group is None:
        return
    import h5py

    frames = group.get("frames")
    # the shape is checked against the bounds below, not a layout: a missing dataset or a group fails here
    shape = frames.shape if isinstance(frames, h5py.Dataset) else ()
    _check_dataset(f, f"{VIDEO_GROUP}/frames", np.dtype("uint8"), shape, VIDEO_DIMS["frames"])
    if len(shape) != 4 or shape[-1] != 3 or 0 in shape:
        raise ValueError(f"'/{VIDEO_GROUP}/frames' must be [T, H, W, 3] RGB frames (got shape {shape})")
    if shape[0] > VIDEO_MAX_FRAMES or max(shape[1:3]) > VIDEO_MAX_SIDE:
        raise ValueError(
            f"'/{VIDEO_GROUP}/frames' has shape {shape}; a capture's clip holds at most {VIDEO_MAX_FRAMES} frames of at "
            f"most {VIDEO_MAX_SIDE} x {VIDEO_MAX_SIDE} pixels (refused)"
        )
    _check_dataset(f, f"{VIDEO_GROUP}/latent_frame", np.dtype("int64"), shape[:1], VIDEO_DIMS["latent_frame"])
    if "fps" not in group.attrs:
        raise ValueError(f"'/{VIDEO_GROUP}' attribute 'fps' is missing")
    fps = group.attrs["fps"]
    if isinstance(fps, (bool, np.bool_)) or not isinstance(fps, (int, float, np.integer, np.floating)) or not (
        np.isfinite(fps) and fps > 0
    ):
        raise ValueError(f"'/{VIDEO_GROUP}' attribute 'fps' must be a finite number > 0 (got {fps!r})")


def video_problem(latent_frame: np.ndarray, grid_frames: int) -> str | None:
    """What is wrong with a clip's latent frames (int [T]) on a grid of ``grid_frames`` frames,
    or None: each must be a frame index in [0, F - 1], non-decreasing along the clip."""
    lf = np.asarray(latent_frame)
    if lf.size and (lf.min() < 0 or lf.max() >= grid_frames or (np.diff(lf) < 0).any()):
        shown = lf.tolist() if lf.size <= 12 else lf[:12].tolist() + ["..."]
        return f"must be non-decreasing latent frame indices in [0, {grid_frames - 1}] (got {shown})"
    return None


def check_structure(f, layout: StoreLayout) -> None:
    """Raise ValueError naming the first way the open file ``f`` departs from the schema
    (metadata only: no map is read)."""
    incomplete = set()
    if STEP_GROUP in f:
        done = {step_key(s) for s in completed_step_groups(f)}
        incomplete = {f"/{STEP_GROUP}/{name}" for name in f[STEP_GROUP] if name not in done}
    if VIDEO_GROUP in f and completed_video(f) is None:
        incomplete.add(f"/{VIDEO_GROUP}")
    _check_links(f, skip=incomplete)
    _check_video(f)
    if "orders" not in f:
        raise ValueError("'/orders' is missing")
    for name, (dtype, shape) in root_datasets(layout).items():
        _check_dataset(f, name, dtype, shape)
    for step, group in completed_step_groups(f).items():
        if step not in layout.steps:
            raise ValueError(f"'/{STEP_GROUP}/{step_key(step)}' is not among the planned steps {list(layout.steps)}")
        prefix = f"{STEP_GROUP}/{step_key(step)}"
        names = layout.datasets(step)
        for name in names:
            dtype, _ = dataset_dtype(name, layout)
            _check_dataset(f, f"{prefix}/{name}", dtype, layout.shape(name), DIMS[name])
            dset = group[name]
            if dset.chunks is not None:  # maps: one chunk each, every one written before `complete`
                maps = int(np.prod(dset.shape, dtype=np.int64)) // int(np.prod(dset.chunks, dtype=np.int64))
                written = dset.id.get_num_chunks()
                if written != maps:
                    raise ValueError(f"'/{prefix}/{name}' has {written} of its {maps} maps written, yet the step is marked complete")
        for dim in sorted({d for name in names for d in DIMS[name]}):
            size = layout.dim_size(dim)
            if dim not in group:
                raise ValueError(f"'/{prefix}/{dim}' is missing")
            if group[dim].shape != (size,):
                raise ValueError(f"'/{prefix}/{dim}' has shape {group[dim].shape}, expected ({size},)")


# ----------------------------------------------------------------------------------------
# content
# ----------------------------------------------------------------------------------------
def _nonfinite(array: np.ndarray) -> str | None:
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count:
        return f"{count} non-finite value{'s' if count > 1 else ''} (NaN/inf)"
    return None


def row_sum_tolerance(dtype: np.dtype, num_blocks: int) -> float:
    """How far a stored block-mass row may sum from 1: ROW_SUM_TOL for float32 maps (stored as
    computed); a float16 map adds its rounding: at most half an ulp relative (eps / 2) of each
    normal entry, so eps / 2 of the row's sum of 1, plus half the smallest subnormal for each of
    the ``num_blocks`` entries below the normal range."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return ROW_SUM_TOL
    info = np.finfo(dtype)
    return ROW_SUM_TOL + float(info.eps) / 2 + num_blocks * float(info.smallest_subnormal) / 2


def map_problem(name: str, array: np.ndarray, num_blocks: int) -> str | None:
    """What is wrong with one map of dataset ``name`` (one head), or None.

    ``array`` is what the writer stores: float32 or float16 [Mq, Mk] for m, L, r, J and scores
    (the row sums of m are checked within :func:`row_sum_tolerance` of its dtype; uint8 maps are
    checked as computed and, in a file, decoded: their rows of m sum to 1 by construction), float16
    [K, N] for footprint, int32 [K] for footprint_block, [N, D] for q, k, v, a float for W,
    uint8 [Mq, Mk] for dfsattn_mask, float32 [Mk] for a recall or density curve (or curves [..., Mk]:
    the message then names the first bad one by its leading indices).
    """
    if name == "footprint_block":
        bad = array[(array < 0) | (array >= num_blocks)]
        return f"query block {int(bad[0])} outside [0, {num_blocks})" if bad.size else None
    if name == "dfsattn_mask":
        if ((array != 0) & (array != 1)).any():
            return f"values other than 0 and 1 ({int(array.max())})"
        empty = np.flatnonzero(~array.any(axis=-1))
        return f"query block {int(empty[0])} attends no key block" if empty.size else None
    if name == "footprint":
        # N x probability in float16 saturates to inf (documented); NaN or negative is damage
        if np.isnan(array).any():
            return f"{int(np.isnan(array).sum())} NaN values"
        return "negative attention" if (array < 0).any() else None
    problem = _nonfinite(array)
    if problem is not None:
        return problem
    if name in ("W_q", "W_k"):
        return "outside [0, 1]" if ((array < NEGATIVE_TOL) | (array > 1 - NEGATIVE_TOL)).any() else None
    if name in CURVE_NAMES:
        return _curve_problem(array)
    if name in ("m", "r", "J") and (array < NEGATIVE_TOL).any():
        return f"negative values (min {float(array.min()):.4g})"
    if name == "m":
        rows = array.sum(axis=-1, dtype=np.float64)
        worst = int(np.abs(rows - 1.0).argmax())
        if abs(rows[worst] - 1.0) > row_sum_tolerance(array.dtype, num_blocks):
            return f"rows do not sum to 1 (query block {worst}: {rows[worst]:.6g})"
    return None


def _curve_problem(curves: np.ndarray) -> str | None:
    """What is wrong with recall or density curves [..., Mk] (entry k - 1: of the top-k mask), or None.
    A curve sums a row of m at a time, so each check allows m's rounding: ROW_SUM_TOL."""
    values = np.asarray(curves, dtype=np.float64)
    mk = values.shape[-1]

    def curve(at: tuple) -> str:
        """``"curve i: "`` naming the curve of ``at`` among several, ``""`` for one."""
        lead = tuple(int(i) for i in at[:-1])
        return f"curve {lead[0] if len(lead) == 1 else lead}: " if lead else ""

    outside = np.argwhere((values < -ROW_SUM_TOL) | (values > 1 + ROW_SUM_TOL))
    if outside.size:
        at = tuple(outside[0])
        return f"outside [0, 1] ({curve(at)}{values[at]:.4g} at k = {at[-1] + 1})"
    falls = np.argwhere(np.diff(values, axis=-1) < -ROW_SUM_TOL)
    if falls.size:
        at = tuple(falls[0])
        after = (*at[:-1], at[-1] + 1)
        return f"decreases with k ({curve(at)}{values[at]:.4g} at k = {at[-1] + 1}, {values[after]:.4g} at k = {at[-1] + 2})"
    short = np.argwhere(np.abs(values[..., -1:] - 1) > ROW_SUM_TOL)
    if short.size:
        at = (*short[0][:-1], mk - 1)
        return f"not 1 with every block kept ({curve(at)}{values[at]:.4g} at k = Mk = {mk})"
    return None


def _label(layout: StoreLayout, name: str, index: tuple[int, ...]) -> str:
    values = {
        "layer": layout.layers, "branch": layout.branches, "order": layout.orders, **method_names(layout),
        "head": layout.heads, "qkv_layer": layout.qkv_layers,
    }
    parts = [f"{dim} {values[dim][i]}" for dim, i in zip(DIMS[name], index)]
    return ", ".join(parts)


def _values(array: np.ndarray) -> list:
    """A coordinate as a plain list (h5py reads strings back as bytes)."""
    return [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]


def read_problem(group, layout: StoreLayout, step: int, name: str, lead: tuple[int, ...], heads,
                 stored: np.ndarray) -> str | None:
    """The first problem of one read of the maps of dataset ``name`` of ``step``, or None.

    A read is the maps at positions ``lead`` of the dims before ``head`` (one layer, branch,
    order, method ...) for the heads selected by ``heads`` (a position, an increasing list of
    positions or a slice). ``stored`` is what the read returned, in the stored dtype (float16
    maps keep float16's row-sum tolerance, :func:`row_sum_tolerance`); uint8 maps are decoded
    with their ``<name>_affine`` rows, read from ``group`` (the step's group), into the values
    the reader returns. The problem names the map: ``"step_0002/m[layer 0, branch cond, order
    raster, head 3]: rows do not sum to 1 (...)"``.
    """
    single = isinstance(heads, (int, np.integer))
    if layout.map_dtype == "uint8" and name in MAP_NAMES:
        stored = decode(stored, group[f"{name}{AFFINE_SUFFIX}"][(*lead, heads)])
    if single:
        positions, stored = [int(heads)], np.asarray(stored)[None]
    else:
        positions = range(len(layout.heads))[heads] if isinstance(heads, slice) else [int(h) for h in heads]
    for h, values in zip(positions, stored):
        problem = map_problem(name, values, layout.num_blocks)
        if problem is not None:
            return f"{step_key(step)}/{name}[{_label(layout, name, (*lead, h))}]: {problem}"
    return None


def header_problems(f, layout: StoreLayout, steps) -> list[str]:
    """Problems in everything of an open file ``f`` but its maps: the values of the permutations,
    the coordinates, the clip's latent frames and the dimension scales of the completed ``steps``
    (reads no map: cheap whatever the file's size)."""
    problems = []
    n = layout.num_tokens
    for order in layout.orders:
        perm = f["orders"][order][...]
        if not np.array_equal(np.sort(perm), np.arange(n)):
            problems.append(f"order {order!r}: stored permutation is not a bijection of 0..{n - 1}")
    if not np.array_equal(f["coords"][...], layout.grid.video_coords().numpy()):
        problems.append(f"coords do not match the grid {layout.grid.name}")
    video = completed_video(f)
    if video is not None:
        problem = video_problem(video["latent_frame"][...], layout.grid.frames)
        if problem is not None:
            problems.append(f"'/{VIDEO_GROUP}/latent_frame' {problem}")
    for step in steps:
        group = f[STEP_GROUP][step_key(step)]
        names = layout.datasets(step)
        for dim in sorted({d for name in names for d in DIMS[name]}):
            got, want = _values(group[dim][...]), _values(dimension_values(layout, dim))
            if got != want:
                problems.append(f"{step_key(step)}/{dim}: coordinate values {got[:8]} ... expected {want[:8]}")
    return problems


def iter_map_problems(f, layout: StoreLayout, steps) -> Iterator[str | None]:
    """Check every map of the completed ``steps`` of an open file ``f``, one read at a time: one
    (step, dataset, layer, branch, order[, method]) with its heads. Yields, after each read, its
    first problem (:func:`read_problem`) or None, so that a caller may stop between reads."""
    for step in steps:
        group = f[STEP_GROUP][step_key(step)]
        for name in layout.datasets(step):
            if name.endswith(AFFINE_SUFFIX):
                continue  # read with its map
            dset = group[name]
            lead = dset.shape[: DIMS[name].index("head")]
            for index in np.ndindex(*lead):
                yield read_problem(group, layout, step, name, index, slice(None), dset[index])
