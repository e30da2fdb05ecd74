"""DFSAttn in real diffusers pipelines: ``apply_dfsattn(pipe_or_transformer, DFSConfig(...))``
installs the DFSAttn attention processors in any transformer of the architecture registry
(:mod:`dfsviz.architectures`) (3D Hilbert order, tile scoring at refresh steps,
per-layer mask cache, block-sparse kernel) and returns a handle whose ``remove()`` restores
the original processors. ``apply_dfsattn(pipe, "dfsattn.json")`` applies a calibrated config
(``dfsviz calibrate``; :class:`CalibratedPlan`, per-head budgets)."""

from dfsviz.accel.config import CFG_MODES, DFSConfig
from dfsviz.accel.plan import CalibratedPlan, LayerBudget, ModelIdentity, select_topk_heads
from dfsviz.accel.handle import DFSHandle, apply_dfsattn, remove_dfsattn
from dfsviz.accel.plan import text_blocks
from dfsviz.accel.processors import CogVideoXDFSProcessor, HunyuanVideoDFSProcessor, SDPADFSProcessor, WanDFSProcessor
from dfsviz.accel.state import DFSState

__all__ = [
    "CFG_MODES",
    "CalibratedPlan",
    "CogVideoXDFSProcessor",
    "DFSConfig",
    "DFSHandle",
    "DFSState",
    "HunyuanVideoDFSProcessor",
    "LayerBudget",
    "ModelIdentity",
    "SDPADFSProcessor",
    "WanDFSProcessor",
    "apply_dfsattn",
    "remove_dfsattn",
    "select_topk_heads",
    "text_blocks",
]
