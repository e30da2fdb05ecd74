"""The architecture registry: one entry per family of diffusers video transformers.

``architecture_for(model)`` (or a class name) gives the :class:`Architecture` that capture
(``dfsviz.capture.adapters``), ``apply_dfsattn`` and the CLI use; a video transformer class
dfsviz refuses raises a ValueError naming the reason (:data:`UNSUPPORTED`). ``support_rows()``
is the table of ``docs/models.md``. This package imports only torch and ``dfsviz.sparse``;
diffusers is imported lazily, inside the forwards.
"""

from __future__ import annotations

import torch

from dfsviz.architectures.entries import ARCHITECTURES, UNSUPPORTED, input_dtype
from dfsviz.architectures.spec import PARALLEL_REFUSALS, Architecture, Unsupported

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "UNSUPPORTED",
    "Unsupported",
    "architecture_for",
    "get_architecture",
    "input_dtype",
    "PARALLEL_REFUSALS",
    "context_parallel_support",
    "models_markdown",
    "pipeline_transformers",
    "supported_classes",
    "support_rows",
]

_BY_NAME = {a.name: a for a in ARCHITECTURES}
_BY_CLASS = {cls: a for a in ARCHITECTURES for cls in a.classes}
_REFUSED = {u.cls: u for u in UNSUPPORTED}


def supported_classes() -> list[str]:
    """Every diffusers transformer class an entry describes, in registry order."""
    return [cls for a in ARCHITECTURES for cls in a.classes]


def get_architecture(name: str) -> Architecture:
    """The entry registered as ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown architecture {name!r}; choose one of {list(_BY_NAME)}")
    return _BY_NAME[name]


def architecture_for(model_or_class) -> Architecture:
    """The entry of a transformer, of its class or of a class name; subclasses match their diffusers base.

    Raises ValueError naming the reason for a video transformer class dfsviz refuses, and
    listing the supported classes for any other class.
    """
    if isinstance(model_or_class, str):
        names = [model_or_class]
    else:
        cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
        names = [c.__name__ for c in cls.__mro__]
    for name in names:
        if name in _BY_CLASS:
            return _BY_CLASS[name]
        if name in _REFUSED:
            raise ValueError(f"unsupported architecture {name}: {_REFUSED[name].reason}")
    raise ValueError(f"unsupported architecture {names[0]}; supported: {', '.join(supported_classes())}")


def pipeline_transformers(pipe) -> dict[str, torch.nn.Module]:
    """Attribute -> transformer of every transformer a diffusers pipeline holds for its family
    (:attr:`Architecture.pipeline_transformers`: ``transformer``, and Wan 2.2 A14B's
    ``transformer_2``), in the order a denoising run uses them; absent ones (None) left out.

    Raises TypeError when ``pipe`` holds none, ValueError when they are not of one family or one
    sits in an attribute its family's pipelines do not use.
    """
    names = dict.fromkeys(name for a in ARCHITECTURES for name in a.pipeline_transformers)
    found = {name: getattr(pipe, name, None) for name in names}
    found = {name: m for name, m in found.items() if isinstance(m, torch.nn.Module)}
    if not found:
        raise TypeError(
            f"`pipe_or_transformer` must be a diffusers video transformer or a pipeline with a "
            f"{' or '.join(f'`.{n}`' for n in names)} (got {type(pipe).__name__})"
        )
    archs = {name: architecture_for(m) for name, m in found.items()}
    first = next(iter(archs.values()))
    for name, arch in archs.items():
        if arch is not first or name not in first.pipeline_transformers:
            raise ValueError(
                f"{type(pipe).__name__}.{name} is a {type(found[name]).__name__} ({arch.title}); a {first.title} pipeline "
                f"holds its transformers in {list(first.pipeline_transformers)}"
            )
    return found


def context_parallel_support(cls: str) -> str:
    """What ``apply_dfsattn`` does with the diffusers class ``cls`` under diffusers' context
    parallelism: "Ulysses" when diffusers ships a context-parallel plan (``_cp_plan``) for it, else
    the reason it is refused."""
    import diffusers

    plan = getattr(getattr(diffusers, cls, None), "_cp_plan", None)
    return "Ulysses" if plan is not None else PARALLEL_REFUSALS["no_plan"]


def support_rows() -> list[dict]:
    """One row per video transformer class: what capture, DFSAttn, permute-once and DFSAttn under
    context parallelism do with it ("yes", "Ulysses" or the reason it is refused), for ``docs/models.md``."""
    rows = []
    for a in ARCHITECTURES:
        for cls in a.classes:
            rows.append({
                "class": cls, "family": a.title, "entry": a.name,
                "self_attention": f"`{a.layer_pattern}`", "skipped": a.skipped, "text": a.text,
                "pipeline": ", ".join(f"`{name}`" for name in a.pipeline_transformers),
                "capture": a.capture or "yes", "dfsattn": a.dfsattn or "yes",
                "permute_once": "yes" if a.permute_once is None else a.permute_once,
                "context_parallel": a.dfsattn or context_parallel_support(cls),
            })
    for u in UNSUPPORTED:
        rows.append({"class": u.cls, "family": u.title, "entry": "-", "self_attention": "-", "skipped": "-",
                     "text": "-", "pipeline": "-", "capture": u.reason, "dfsattn": u.reason, "permute_once": u.reason,
                     "context_parallel": u.reason})
    return rows


_COLUMNS = (("class", "class"), ("family", "family"), ("entry", "entry"), ("self_attention", "self-attention layers"),
            ("skipped", "not captured"), ("text", "text in the sequence"), ("pipeline", "pipeline transformers"),
            ("capture", "capture (CLI)"), ("dfsattn", "apply_dfsattn"), ("permute_once", "permute-once"),
            ("context_parallel", "apply_dfsattn under context parallelism"))


def models_markdown() -> str:
    """The support table of ``docs/models.md`` (one row per class of :func:`support_rows`), and
    below it what is refused under every class's context parallelism."""
    lines = ["| " + " | ".join(title for _, title in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in support_rows():
        cells = [f"`{row[key]}`" if key == "class" else str(row[key]).replace("|", "\\|") for key, _ in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Context parallelism, every class: DFSAttn runs under diffusers' Ulysses attention "
              "(`ContextParallelConfig(ulysses_degree=P)`), where each rank holds the whole sequence of H/P heads "
              f"between diffusers' all-to-alls. Refused: ring attention ({PARALLEL_REFUSALS['ring']}); "
              f"`ulysses_anything` ({PARALLEL_REFUSALS['ulysses_anything']}); tensor parallelism "
              f"({PARALLEL_REFUSALS['tensor']}); permute-once (the per-call order serves instead, "
              "[accel.md](accel.md#several-gpus)). Capture does not run under context parallelism yet."]
    return "\n".join(lines)
