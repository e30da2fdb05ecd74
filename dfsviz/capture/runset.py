"""Run sets: several clips of one model captured in one command, one capture file per clip.

A run set is a directory holding one capture file per clip (a clip is a prompt and a seed)
and ``runset.json``, a small versioned manifest: the clip list and the settings the clips
share. ``dfsviz capture --prompts FILE --seeds 0-3 --out DIR`` writes one
(:func:`capture_run_set`), :func:`open_run_set` reads one and ``dfsviz calibrate DIR`` pools
its clips. Each clip is an ordinary capture (:func:`~dfsviz.capture.runner.run_capture`: its
own lock, crash safety and resume); the model is loaded once for all of them. The clip list
and the file names follow from the settings alone, so any process can plan the same run set.
Under ``torchrun`` the clips are spread over the ranks, each rank capturing whole clips on its
own device (data parallel; :class:`~dfsviz.capture.ranks.ClipRanks`). The format is documented
in docs/format.md ("Run sets").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Callable

from dfsviz.capture.file_safety import CaptureLock, missing_folder, run_difference, temporary_path
from dfsviz.capture.config import MAX_SEED, CaptureConfig
from dfsviz.capture.ranks import ClipRanks, check_rank_device, check_same_run, on_rank_0, together, world_size
from dfsviz.capture.resolve import ResolvedCapture, resolve_capture, run_identity, weights_fingerprint
from dfsviz.capture.runner import run_capture
from dfsviz.capture.sources import ModelSource, load_model_source
from dfsviz.models.sampler import embedded_model_name

__all__ = [
    "MANIFEST_NAME",
    "MAX_CLIPS",
    "RUNSET_FORMAT",
    "RUNSET_FORMAT_VERSION",
    "RunSet",
    "RunSetClip",
    "RunSetConfig",
    "RunSetResult",
    "capture_run_set",
    "describe_run_set",
    "open_run_set",
    "read_prompts",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "runset.json"
RUNSET_FORMAT = "dfsviz-runset"
RUNSET_FORMAT_VERSION = 1
#: Clips of one run set at most (prompts x seeds).
MAX_CLIPS = 10_000
# characters of a prompt kept in a clip's file name
_SLUG_CHARS = 40
# what each clip sets for itself: the run set's shared settings are a clip's run identity less these
_PER_CLIP = ("prompt", "seed")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _slug(prompt: str) -> str:
    """``"A red disc, moving!"`` -> ``"a-red-disc-moving"`` (ASCII letters and digits, at most 40)."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:_SLUG_CHARS].strip("-")


def _clip_file(index: int, count: int, prompt: str, seed: int) -> str:
    width = max(3, len(str(count - 1)))
    slug = _slug(prompt)
    return f"{index:0{width}d}_{slug}_s{seed}.h5" if slug else f"{index:0{width}d}_s{seed}.h5"


@dataclass(frozen=True)
class RunSetClip:
    """One clip of a run set.

    Fields:
        index: its position in the clip list (0-based).
        prompt: its prompt (embedded model: a class name).
        seed: its seed.
        file: its capture file, a plain name inside the run-set directory.
        complete: its capture is complete (read from the manifest by :func:`open_run_set`;
            False in a plan).
    """

    index: int
    prompt: str
    seed: int
    file: str
    complete: bool = False

    @property
    def label(self) -> str:
        """How messages name the clip: ``clip 3 (003_red-disc_s2.h5: prompt 'red disc', seed 2)``."""
        prompt = f"prompt {self.prompt!r}, " if self.prompt else ""
        return f"clip {self.index} ({self.file}: {prompt}seed {self.seed})"


# ----------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> tuple[str, ...]:
    """The prompts of a text file: one per line, surrounding blanks stripped; blank lines and
    lines starting with ``#`` are skipped.

    Raises ValueError for a missing file, a file that is not UTF-8 text, one that holds no
    prompt or more than :data:`MAX_CLIPS`.
    """
    file = Path(path)
    if not file.exists():
        raise ValueError(f"`prompts` file {str(file)!r} does not exist; pass a text file with one prompt per line")
    if not file.is_file():
        raise ValueError(f"`prompts` file {str(file)!r} is not a file; pass a text file with one prompt per line")
    prompts: list[str] = []
    with open(file, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"`prompts` file {str(file)!r} is not UTF-8 text (line {number}); save it as UTF-8") from None
            if "\x00" in line:
                raise ValueError(f"`prompts` file {str(file)!r} is not text: line {number} holds a NUL byte")
            if not line or line.startswith("#"):
                continue
            if len(prompts) == MAX_CLIPS:
                raise ValueError(f"`prompts` file {str(file)!r} holds more than {MAX_CLIPS} prompts; a run set has at "
                                 f"most {MAX_CLIPS} clips: split it")
            prompts.append(line)
    if not prompts:
        raise ValueError(f"`prompts` file {str(file)!r} holds no prompt (only blank lines and # comments)")
    return tuple(prompts)


@dataclass(frozen=True)
class RunSetConfig:
    """Settings of a run set: one capture per clip, the clips being prompts x seeds (validated
    on construction).

    Fields:
        capture: the settings every clip shares (:class:`~dfsviz.capture.config.CaptureConfig`).
            Its ``out`` is the run-set directory (created if missing; its parent must exist);
            its ``overwrite`` and ``resume`` apply to the whole set; each clip replaces its
            ``prompt`` and ``seed``.
        prompts: the clips' prompts; ``"all"`` = every class of the embedded model (``model``
            None); None = ``capture.prompt`` alone. Several prompts need conditioning that
            follows the prompt: the embedded model, not ``embeddings``.
        seeds: the clips' seeds, each in [0, 2^63 - 1]; None = ``capture.seed`` alone.

    The clips run prompt by prompt, each prompt with every seed in turn; at most
    :data:`MAX_CLIPS`. ``capture.context_parallel`` spreads one clip over the ranks, so a run set
    of several clips refuses it (under torchrun the clips themselves are spread over the ranks).
    """

    capture: CaptureConfig
    prompts: tuple[str, ...] | str | None = None
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        cfg = self.capture
        if not isinstance(cfg, CaptureConfig):
            raise TypeError(f"`capture` must be a CaptureConfig (got {type(cfg).__name__})")
        prompts = self.prompts
        if prompts is None:
            prompts = (cfg.prompt,)
        elif prompts == "all":
            if embedded_model_name(cfg.model) is None:
                raise ValueError(f"`prompts`='all' lists the embedded model's classes; with `model` {cfg.model!r} "
                                 "list the prompts (a file with one per line)")
            from dfsviz.models import class_names

            prompts = tuple(class_names())
        if isinstance(prompts, str) or not isinstance(prompts, (tuple, list)):
            raise ValueError(f"`prompts` must be a list of prompts, 'all' or None (got {prompts!r})")
        if not prompts:
            raise ValueError("`prompts` must list at least one prompt")
        seen: set = set()
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"`prompts` must be strings or 'all' (got {p!r})")
            if "\n" in p or "\r" in p or "\x00" in p:
                raise ValueError(f"`prompts` must be one line each, without NUL (got {p!r})")
            if p in seen:
                raise ValueError(f"`prompts` lists {p!r} twice; each clip is captured once")
            seen.add(p)
        seeds = (cfg.seed,) if self.seeds is None else self.seeds
        if not isinstance(seeds, (tuple, list)) or not seeds:
            raise ValueError(f"`seeds` must list at least one seed (got {seeds!r})")
        seen = set()
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise ValueError(f"`seeds` must be integers in [0, {MAX_SEED}] (got {s!r}); seeds are stored as 64-bit "
                                 "signed integers")
            if s in seen:
                raise ValueError(f"`seeds` lists seed {s} twice; each clip is captured once")
            seen.add(s)
        count = len(prompts) * len(seeds)
        if count > MAX_CLIPS:
            raise ValueError(f"a run set has at most {MAX_CLIPS} clips (got {len(prompts)} prompts x {len(seeds)} seeds "
                             f"= {count}); split it into several run sets")
        if len(prompts) > 1 and cfg.embeddings is not None:
            raise ValueError(f"several prompts need conditioning per prompt, but `embeddings`={cfg.embeddings!r} "
                             "ignores the prompt (clips of one seed would be identical); capture one prompt with several "
                             "seeds, or one run set per embeddings file")
        if count > 1 and cfg.context_parallel is not None:
            raise ValueError(f"`context_parallel`={cfg.context_parallel!r} spreads one clip over the ranks, but the run "
                             f"set has {count} clips: drop --context-parallel to spread the clips over the ranks (each "
                             "clip whole on one rank), or capture each clip with --context-parallel in its own command")
        if count > 1 and Path(cfg.out).suffix.lower() in (".h5", ".hdf5"):
            raise ValueError(f"`out` {cfg.out!r} names a file, but the run set has {count} clips: name a directory, "
                             f"e.g. {str(Path(cfg.out).with_suffix(''))!r}")
        object.__setattr__(self, "prompts", tuple(prompts))
        object.__setattr__(self, "seeds", tuple(seeds))

    @cached_property
    def clips(self) -> tuple[RunSetClip, ...]:
        """The planned clips, in capture order (every seed of the first prompt, then the next)."""
        count = len(self.prompts) * len(self.seeds)
        pairs = [(p, s) for p in self.prompts for s in self.seeds]
        return tuple(RunSetClip(i, p, s, _clip_file(i, count, p, s)) for i, (p, s) in enumerate(pairs))

    def clip_config(self, clip: RunSetClip, *, resume: bool = False) -> CaptureConfig:
        """The capture settings of one clip: its file in the run-set directory, its prompt and
        seed; ``resume`` continues its file (else it is created, replaced under ``overwrite``)."""
        return dataclasses.replace(self.capture, out=str(Path(self.capture.out) / clip.file), prompt=clip.prompt,
                                   seed=clip.seed, resume=resume, overwrite=self.capture.overwrite and not resume)


# ----------------------------------------------------------------------------------------
# the manifest
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSet:
    """A run set on disk (:func:`open_run_set`).

    Fields:
        path: the run-set directory.
        clips: its clips; ``complete`` when the manifest marks the clip complete and its file exists.
        settings: what every clip shares: a clip's run identity (resolved settings and the
            SHA-256 of the model weights) less its prompt and seed.
        dfsviz_version, created_utc, updated_utc: who wrote the manifest, and when.
    """

    path: Path
    clips: tuple[RunSetClip, ...]
    settings: dict
    dfsviz_version: str
    created_utc: str
    updated_utc: str

    @property
    def complete(self) -> bool:
        """Every clip is complete."""
        return all(c.complete for c in self.clips)

    def capture_files(self, *, allow_incomplete: bool = False) -> list[Path]:
        """The capture files of the complete clips, in clip order.

        Raises ValueError when a clip is not complete (unless ``allow_incomplete``) or none is.
        """
        done = [c for c in self.clips if c.complete]
        missing = [c.index for c in self.clips if not c.complete]
        if missing and not allow_incomplete or not done:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise ValueError(
                f"run set {str(self.path)!r} has {len(done)} of {len(self.clips)} clips complete (missing: clip"
                f"{'s' if len(missing) > 1 else ''} {shown}); finish it by running its `dfsviz capture` command again "
                "with --resume"
                + (" or pass --allow-incomplete to use the complete clips" if done else "")
            )
        return [self.path / c.file for c in done]


def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and name == Path(name).name and "/" not in name and "\\" not in name
            and not name.startswith(".") and name.endswith(".h5"))


def _read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``, checked (ValueError naming the first problem)."""
    from dfsviz._version import __version__

    if not folder.is_dir():
        reason = "no such directory" if not folder.exists() else "not a directory"
        raise ValueError(f"{str(folder)!r} is not a run set: {reason}")
    file = folder / MANIFEST_NAME
    if not file.is_file():
        raise ValueError(f"{str(folder)!r} is not a run set: it holds no {MANIFEST_NAME}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"run set {str(folder)!r}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != RUNSET_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{str(folder)!r} is not a run set: {MANIFEST_NAME} has format {found!r}, not {RUNSET_FORMAT!r}")
    version = data.get("format_version")
    if version != RUNSET_FORMAT_VERSION:
        writer = data.get("dfsviz_version", "unknown")
        raise ValueError(f"run set {str(folder)!r} has format version {version}, written by dfsviz {writer}; this dfsviz "
                         f"{__version__} reads version {RUNSET_FORMAT_VERSION}: open it with dfsviz {writer}")

    def malformed(what: str) -> ValueError:
        return ValueError(f"run set {str(folder)!r}: {MANIFEST_NAME} is malformed ({what}); capture the run set into "
                          "a new directory")

    clips = data.get("clips")
    if not isinstance(data.get("settings"), dict):
        raise malformed("no settings object")
    if not isinstance(clips, list) or not clips or len(clips) > MAX_CLIPS:
        raise malformed(f"`clips` must be a list of 1 to {MAX_CLIPS} clips")
    files = set()
    for i, clip in enumerate(clips):
        if not isinstance(clip, dict) or clip.get("index") != i or not isinstance(clip.get("prompt"), str) \
                or isinstance(clip.get("seed"), bool) or not isinstance(clip.get("seed"), int) \
                or not isinstance(clip.get("complete"), bool):
            raise malformed(f"clip {i} must hold index {i}, a prompt, a seed and complete")
        if not _plain_name(clip.get("file")):
            raise ValueError(f"run set {str(folder)!r}: clip {i} names the file {clip.get('file')!r}; clip files are plain "
                             "names inside the run-set directory")
        if clip["file"] in files:
            raise malformed(f"clip {i} repeats the file {clip['file']!r}")
        files.add(clip["file"])
    return data


def open_run_set(path: str | os.PathLike) -> RunSet:
    """Read a run-set directory's manifest: its clips, which are complete, the shared settings.

    Raises ValueError for a path that is not a run set (no directory, no ``runset.json``), a
    manifest of an unknown format version (naming the dfsviz that wrote it) or a malformed one.
    """
    folder = Path(path)
    data = _read_manifest(folder)
    clips = tuple(RunSetClip(c["index"], c["prompt"], c["seed"], c["file"],
                             c["complete"] and (folder / c["file"]).is_file()) for c in data["clips"])
    return RunSet(folder, clips, data["settings"], str(data.get("dfsviz_version", "")), str(data.get("created_utc", "")),
                  str(data.get("updated_utc", "")))


def _manifest_lock(folder: Path) -> CaptureLock:
    """The manifest's lock, waited for: the ranks of a data-parallel run set take turns at it.
    Taking it removes the temporary manifests of a run killed while writing one."""
    return CaptureLock(folder / MANIFEST_NAME, wait=True)


def _mark_clip(folder: Path, index: int, complete: bool) -> None:
    """Record in the manifest whether clip ``index`` is complete: read, changed and written under
    its lock, so that ranks finishing clips at once keep each other's marks."""
    with _manifest_lock(folder):
        manifest = _read_manifest(folder)
        manifest["clips"][index]["complete"] = complete
        manifest["complete"] = all(c["complete"] for c in manifest["clips"])
        _write_manifest(folder, manifest)


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest whole or not at all: a temporary file renamed over it (under
    :func:`_manifest_lock`)."""
    manifest["updated_utc"] = _now()
    target = folder / MANIFEST_NAME
    tmp = temporary_path(target)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------
@dataclass
class RunSetResult:
    """What :func:`capture_run_set` did.

    Fields:
        path: the run-set directory.
        clips: clips in the run set.
        captured: clips captured (or finished) by this run; skipped: clips already complete.
        complete: every clip is complete.
        seconds: wall time of the run.
        file_bytes: total size of the clip files.
        rank: the rank that returned it under torchrun (0 in one process). Every rank returns
            the whole set's result (``captured`` counts every rank's clips); rank 0 reports it.
    """

    path: str
    clips: int
    captured: list[int]
    skipped: list[int]
    complete: bool
    seconds: float
    file_bytes: int
    rank: int = 0


def _resolve_clips(config: RunSetConfig, source: ModelSource) -> dict[str, ResolvedCapture]:
    """Each distinct prompt resolved once (a seed changes no setting of the file): every clip's
    settings are checked before the first is captured. ValueError names the clip."""
    if len(config.prompts) > 1 and config.capture.embeddings is None and source.encode_prompt is None:
        raise ValueError(f"several prompts need conditioning per prompt, but {source.model_id!r} takes its conditioning "
                         "from --embeddings (dfsviz encodes prompts for the embedded model only); capture one prompt "
                         "with several seeds")
    resolved: dict[str, ResolvedCapture] = {}
    for clip in config.clips:
        if clip.prompt not in resolved:
            try:
                resolved[clip.prompt] = resolve_capture(config.clip_config(clip), source=source)
            except ValueError as exc:
                raise ValueError(f"{clip.label}: {exc}") from None
    return resolved


def describe_run_set(config: RunSetConfig) -> dict:
    """The resolved settings, the clips and the estimated size, JSON-ready (``--dry-run``).

    The first clip's :meth:`~dfsviz.capture.resolve.ResolvedCapture.describe`, with ``out`` the
    run-set directory, ``clips`` (index, prompt, seed, file and its uncompressed size bound)
    and ``estimated_total_bytes_uncompressed``. The model is built without its weights
    (shapes only), except the embedded model, which is small. ValueError for an output the
    capture would refuse.
    """
    _check_output(config, Path(config.capture.out))
    source = load_model_source(config.capture, load_weights=False)
    resolved = _resolve_clips(config, source)
    info = resolved[config.clips[0].prompt].describe()
    info["out"] = config.capture.out
    info["clips"] = [{"index": c.index, "prompt": c.prompt, "seed": c.seed, "file": c.file,
                      "estimated_file_bytes_uncompressed": resolved[c.prompt].layout.total_bytes()} for c in config.clips]
    info["estimated_total_bytes_uncompressed"] = sum(c["estimated_file_bytes_uncompressed"] for c in info["clips"])
    return info


def _check_folder(config: RunSetConfig, folder: Path) -> None:
    """ValueError for a run-set ``folder`` that is a file, or whose parent is missing."""
    parent_state = missing_folder(folder.parent)
    if parent_state is not None:
        raise ValueError(f"the parent of the run-set directory {str(folder)!r} {parent_state}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"run set output {str(folder)!r} is a file; a run set of {len(config.clips)} clips needs a "
                         "directory")


def _check_output(config: RunSetConfig, folder: Path) -> dict | None:
    """The manifest of the run set being resumed or replaced, None for a new one; ValueError
    for an output that cannot take this run set (``--dry-run`` checks it too)."""
    cfg = config.capture
    _check_folder(config, folder)
    if not folder.exists() or not (folder / MANIFEST_NAME).exists():
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
        if others:
            raise ValueError(f"{str(folder)!r} holds other files and no run set ({MANIFEST_NAME}); pass a new or empty "
                             "directory as --out")
        if cfg.resume:
            raise ValueError(f"--resume: run set {str(folder)!r} does not exist; drop --resume to start it")
        return None
    previous = _read_manifest(folder)
    if not (cfg.overwrite or cfg.resume):
        raise ValueError(f"run set {str(folder)!r} exists; pass --overwrite to replace it or --resume to continue it")
    if cfg.resume:
        from dfsviz._version import __version__

        writer = previous.get("dfsviz_version")
        if writer != __version__:
            raise ValueError(f"--resume: run set {str(folder)!r} was written by dfsviz {writer}, this is dfsviz "
                             f"{__version__}; a run set holds the clips of one dfsviz: resume with dfsviz {writer} or "
                             "pass --overwrite")
        there, now = previous["clips"], config.clips
        hint = "resume with the same --prompts and --seeds or pass --overwrite"
        if len(there) != len(now):
            raise ValueError(f"--resume: {str(folder)!r} holds another run set: {len(there)} clips there, {len(now)} "
                             f"now; {hint}")
        for old, new in zip(there, now):  # a clip's file follows from its index, prompt and seed
            if (old["prompt"], old["seed"]) != (new.prompt, new.seed):
                raise ValueError(
                    f"--resume: {str(folder)!r} holds another run set: clip {new.index} is (prompt {old['prompt']!r}, "
                    f"seed {old['seed']}) there and (prompt {new.prompt!r}, seed {new.seed}) now; {hint}")
    return previous


def _check_same_settings(folder: Path, stored: dict, settings: dict) -> None:
    kind, keys = run_difference(stored, settings) or (None, [])
    if kind == "weights":
        raise ValueError(f"--resume: the model weights differ from those of the run set {str(folder)!r}; resume with "
                         "the same weights or pass --overwrite")
    if keys:
        raise ValueError(f"--resume: run set {str(folder)!r} was captured with other settings (differs in "
                         f"{keys}); resume with the same options or pass --overwrite")


def _remove_old_clips(folder: Path, previous: dict) -> None:
    """Delete the clip files of the run set being replaced (only those; each under its lock)."""
    for clip in previous["clips"]:
        path = folder / clip["file"]
        with CaptureLock(path):
            path.unlink(missing_ok=True)


def capture_run_set(
    config: RunSetConfig,
    progress: bool = True,
    *,
    source: ModelSource | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> RunSetResult:
    """Capture every clip of a run set into ``config.capture.out``, a directory.

    The model is loaded once (or taken from ``source``) and every clip's settings are
    resolved before the first clip starts, so a bad prompt stops the run before any work.
    The manifest is written (atomically) before the first clip and after each one. Each clip
    is a :func:`~dfsviz.capture.runner.run_capture` of its own file: with ``resume`` the
    complete clips are skipped, an interrupted one is continued and the missing ones are
    started; with ``overwrite`` the previous run set's clip files are deleted first.

    Under ``torchrun`` (``WORLD_SIZE`` > 1; call it on every rank with the same ``config``) the
    clips are spread over the ranks: each rank loads the model on its own device (its
    ``LOCAL_RANK``'s GPU, or the CPU with gloo) and captures whole clips, its share of those
    still to capture (:meth:`~dfsviz.capture.ranks.ClipRanks.deal`: the r-th, (r+P)-th, ...).
    Rank 0 takes the run set's lock, checks the output and writes the first manifest; each rank
    marks its clips in the manifest as they complete; the ranks end together, and every rank
    returns the whole set's result. A clip that fails stops its rank's share; the other ranks
    finish theirs, then every rank raises the first failure.

    Args:
        config: the run set.
        progress: show one tqdm bar over the clips to capture x captured steps (under torchrun,
            rank 0's bar over its own clips).
        source: a model already in memory (skips loading ``config.capture.model``).
        on_step: called with (clip index, step) after each captured step is flushed (under
            torchrun on the rank that captured it).

    Returns:
        A :class:`RunSetResult`.

    Raises:
        ValueError: an output that cannot take the run set (a file, a directory of other
            files, an existing run set without ``overwrite``/``resume``, another run set, other
            settings or another dfsviz on ``resume``, another writer), a clip whose settings do
            not fit the model, ranks that would capture another run set than rank 0's or a
            ``device`` naming one GPU under torchrun, or a clip that fails (named; the completed
            clips are kept).
    """
    if not isinstance(config, RunSetConfig):
        raise TypeError(f"`config` must be a RunSetConfig (got {type(config).__name__})")
    start = time.perf_counter()
    folder = Path(config.capture.out)
    clips = config.clips
    ranks = None
    if world_size() > 1:
        check_rank_device(config.capture.device, "under torchrun")
        ranks = ClipRanks.join(config.capture.torch_device)
    held: list[CaptureLock] = []  # rank 0's lock of the run set, held until every rank is done

    def claim() -> dict | None:
        _check_folder(config, folder)  # the lock file goes next to it
        held.append(CaptureLock(folder))  # one writer per run set, before anything is loaded or created
        return _check_output(config, folder)

    try:
        previous = on_rank_0(ranks, claim)
        with together(ranks):
            if source is None:
                source = load_model_source(config.capture)
            if source.weights_sha256 is None:  # hashed once for every clip's identity
                source = dataclasses.replace(source, weights_sha256=weights_fingerprint(source.transformer))
            resolved = _resolve_clips(config, source)
        first = resolved[clips[0].prompt]
        identity = run_identity(first, source.weights_sha256)
        settings = {k: v for k, v in identity.items() if k not in _PER_CLIP}
        if ranks is not None:
            from dfsviz._version import __version__

            check_same_run(ranks, {**settings, "dfsviz_version": __version__}, "run set")
        todo = on_rank_0(ranks, lambda: _start(config, folder, previous, settings))
        mine = todo if ranks is None else ranks.deal(todo)
        if ranks is not None:
            _log_shares(folder, ranks, todo, mine)
        captured, failure = _capture_clips(config, [clips[i] for i in mine], source, folder,
                                           progress and (ranks is None or ranks.writes), on_step,
                                           len(first.capture_steps))
        if ranks is not None:
            shares = ranks.gather((captured, failure))
            captured = sorted(i for share, _ in shares for i in share)
            failure = next((f for _, f in shares if f is not None), None)
        manifest = _read_manifest(folder)
        if failure is not None:
            done = [e["index"] for e in manifest["clips"] if e["complete"]]
            kept = (f"the completed clips {done} are kept: --resume continues the run set" if done
                    else "no clip is complete yet")
            raise ValueError(f"{failure}; {kept}")
    finally:
        for lock in held:
            lock.release()
    return RunSetResult(
        path=str(folder),
        clips=len(clips),
        captured=captured,
        skipped=[c.index for c in clips if c.index not in todo],
        complete=manifest["complete"],
        seconds=time.perf_counter() - start,
        file_bytes=sum((folder / c.file).stat().st_size for c in clips if (folder / c.file).is_file()),
        rank=0 if ranks is None else ranks.rank,
    )


def _start(config: RunSetConfig, folder: Path, previous: dict | None, settings: dict) -> list[int]:
    """Begin the run set (rank 0, or the one process): check a resumed run set's settings,
    delete a replaced one's clip files, write the first manifest. Returns the indices of the
    clips to capture: all but those complete with their file."""
    clips = config.clips
    resume = config.capture.resume
    if resume:
        _check_same_settings(folder, previous["settings"], settings)
    done = [bool(c["complete"]) and (folder / c["file"]).is_file() for c in previous["clips"]] if resume \
        else [False] * len(clips)
    if previous is not None and not resume:
        _remove_old_clips(folder, previous)
    folder.mkdir(exist_ok=True)
    from dfsviz._version import __version__

    manifest = {
        "format": RUNSET_FORMAT,
        "format_version": RUNSET_FORMAT_VERSION,
        "dfsviz_version": __version__,
        "created_utc": previous["created_utc"] if resume and "created_utc" in previous else _now(),
        "updated_utc": "",
        "complete": all(done),
        "settings": settings,
        "clips": [{"index": c.index, "prompt": c.prompt, "seed": c.seed, "file": c.file, "complete": d}
                  for c, d in zip(clips, done)],
    }
    with _manifest_lock(folder):
        _write_manifest(folder, manifest)
    return [c.index for c, d in zip(clips, done) if not d]


def _log_shares(folder: Path, ranks: ClipRanks, todo: list[int], mine: list[int]) -> None:
    logger.info("run set %s: rank %d of %d captures clips %s", folder, ranks.rank, ranks.size, mine)
    if ranks.writes and len(todo) < ranks.size:  # more ranks than clips is fine: the idle ones wait for the end
        idle = ", ".join(map(str, range(len(todo), ranks.size)))
        logger.warning("run set %s: %d clip%s to capture over %d ranks; %s none", folder, len(todo),
                       "" if len(todo) == 1 else "s", ranks.size,
                       f"rank {idle} has" if len(todo) == ranks.size - 1 else f"ranks {idle} have")


def _capture_clips(config: RunSetConfig, clips: list[RunSetClip], source: ModelSource, folder: Path, progress: bool,
                   on_step, steps_per_clip: int) -> tuple[list[int], str | None]:
    """Capture ``clips`` in turn, marking each in the manifest as it completes. Returns the
    clips captured and, when one failed (the last), what failed."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(clips) * steps_per_clip, unit="step", desc="capture")
    captured: list[int] = []
    try:
        for clip in clips:
            if bar is not None:
                bar.set_description(f"clip {clip.index + 1}/{len(config.clips)}")

            def step_done(step: int, index: int = clip.index) -> None:
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    on_step(index, step)

            try:
                cfg = config.clip_config(clip, resume=config.capture.resume and (folder / clip.file).exists())
                result = run_capture(cfg, progress=False, source=source, on_step=step_done)
            except (ValueError, TypeError, OSError) as exc:
                return captured, f"{clip.label} failed: {exc}"
            if bar is not None:
                bar.update(len(result.skipped))
            captured.append(clip.index)
            _mark_clip(folder, clip.index, result.complete)
            logger.info("run set %s: %s captured in %.1f s", folder, clip.label, result.seconds)
    finally:
        if bar is not None:
            bar.close()
    return captured, None
