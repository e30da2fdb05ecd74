"""The embedded tiny video DiT: procedural training clips, config, training and sampling.

A small ``diffusers.WanTransformer3DModel`` trained by flow matching on procedural
videos (``videos``), shipped in ``dfsviz/data/models/tiny-wan`` and loaded with
``load_embedded_model``; ``sample_videos`` runs the denoising loop with per-step hooks.
Training lives in ``dfsviz.models.train`` (``python -m dfsviz.models.train``).
diffusers is imported only when a model is built or loaded.
"""

from dfsviz.models.config import PATCH_SIZE, PRESETS, EmbeddedModelConfig, get_preset
from dfsviz.models.sampler import (
    DenoiseStep,
    EmbeddedModel,
    default_model_dir,
    encode_labels,
    frame_strip,
    load_embedded_model,
    sample_videos,
    save_embedded_model,
    video_to_uint8,
)
from dfsviz.models.videos import VIDEO_CLASSES, VideoClass, class_names, class_table, make_videos, sample_labels

__all__ = [
    "PATCH_SIZE",
    "PRESETS",
    "VIDEO_CLASSES",
    "DenoiseStep",
    "EmbeddedModel",
    "EmbeddedModelConfig",
    "VideoClass",
    "class_names",
    "class_table",
    "default_model_dir",
    "encode_labels",
    "frame_strip",
    "get_preset",
    "load_embedded_model",
    "make_videos",
    "sample_labels",
    "sample_videos",
    "save_embedded_model",
    "video_to_uint8",
]
