"""The embedded video DiTs: procedural training clips, config, training and sampling.

Small ``diffusers.WanTransformer3DModel``s trained by flow matching on procedural
videos (``videos``), shipped in ``dfsviz/data/models/tiny-wan`` (41 key blocks) and
``medium-wan`` (256 key blocks, Wan2.1 480p's token grid) and loaded with
``load_embedded_model(embedded_model_dir(name))``; ``sample_videos`` runs the denoising loop with per-step hooks.
Training lives in ``dfsviz.models.train`` (``python -m dfsviz.models.train``).
diffusers is imported only when a model is built or loaded.
"""

from dfsviz.models.config import PATCH_SIZE, PRESETS, EmbeddedModelConfig, get_preset
from dfsviz.models.sampler import (
    DenoiseStep,
    EmbeddedModel,
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    embedded_model_dir,
    embedded_model_name,
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
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "embedded_model_dir",
    "embedded_model_name",
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
