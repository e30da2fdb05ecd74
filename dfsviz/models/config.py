"""Configuration of the embedded video DiTs and of the clips they are trained on.

One frozen dataclass holds everything that fixes the model's shapes (so a saved
model can be rebuilt and checked) and the data it learned from. The shipped model
is the ``tiny-wan`` preset; ``medium-wan`` is the recipe at Wan2.1 480p's token grid
(not trained yet); ``smoke`` is a CPU-sized twin for tests and dry runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dfsviz.models.videos import VIDEO_CLASSES, check_camera_pan
from dfsviz.sparse.grid import LatentGrid

__all__ = ["PATCH_SIZE", "EmbeddedModelConfig", "PRESETS", "get_preset"]

# Wan's own patching: one frame deep, 2 x 2 pixels wide; every pixel frame is a token frame.
PATCH_SIZE: tuple[int, int, int] = (1, 2, 2)


def _positive_int(value: object, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer (got {value!r}); {hint}")


@dataclass(frozen=True)
class EmbeddedModelConfig:
    """Shapes of the embedded ``WanTransformer3DModel`` and of its procedural training clips.

    Fields:
        name: model name, the folder under ``dfsviz/data/models/`` (letters, digits, '-', '_').
        frames: F, clip length in frames (>= 1); also the token grid's frames (patch depth 1).
        height: clip height in pixels, even, >= 8; token rows Hs = height / 2.
        width: clip width in pixels, even, >= 8; token columns Ws = width / 2.
        num_layers: transformer blocks (>= 1).
        num_heads: attention heads per block (>= 1).
        head_dim: channels per head; even and >= 6 so Wan's RoPE can split it over (t, h, w).
        ffn_dim: feed-forward hidden width (>= 1).
        text_dim: width of each class-embedding token, Wan's ``text_dim`` (>= 1).
        text_len: class-embedding tokens per clip, the cross-attention key length (>= 1).
        freq_dim: sinusoidal timestep-embedding width, even (>= 2).
        rope_max_seq_len: RoPE table length, >= max(F, Hs, Ws).
        min_objects, max_objects: objects per clip, 1 <= min <= max <= 8.
        shift: flow-matching timestep shift (> 0), used to draw training noise levels
            and by the sampler's scheduler; 1 is no shift, larger spends more steps at high noise.
        camera_pan: fastest camera pan of the clips in frame heights per frame, in [0, 0.1]
            (0: a still camera, as the tiny model's clips).
    """

    name: str = "tiny-wan"
    frames: int = 9
    height: int = 36
    width: int = 64
    num_layers: int = 8
    num_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 768
    text_dim: int = 64
    text_len: int = 4
    freq_dim: int = 128
    rope_max_seq_len: int = 256
    min_objects: int = 2
    max_objects: int = 4
    shift: float = 1.0
    camera_pan: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"`name` must be non-empty letters, digits, '-' or '_' (got {self.name!r}), "
                             "e.g. 'tiny-wan'")
        for field, hint in (("frames", "clip length in frames"), ("num_layers", "e.g. 8"), ("num_heads", "e.g. 3"),
                            ("ffn_dim", "e.g. 4 x heads x head_dim"), ("text_dim", "e.g. 64"),
                            ("text_len", "e.g. 4 class tokens"), ("rope_max_seq_len", "e.g. 256"),
                            ("min_objects", "at least one object per clip"), ("max_objects", "e.g. 4")):
            _positive_int(getattr(self, field), field, hint)
        for field in ("height", "width"):
            value = getattr(self, field)
            _positive_int(value, field, "give the clip size in pixels")
            if value < 8 or value % PATCH_SIZE[1]:
                raise ValueError(f"`{field}` must be an even number of pixels >= 8 (got {value}); "
                                 "Wan patches 2 x 2 pixels into one token")
        _positive_int(self.head_dim, "head_dim", "e.g. 64")
        if self.head_dim < 6 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even and >= 6 (got {self.head_dim}); Wan's RoPE splits it "
                             "into time, height and width parts of even size")
        _positive_int(self.freq_dim, "freq_dim", "e.g. 128")
        if self.freq_dim % 2:
            raise ValueError(f"`freq_dim` must be even (got {self.freq_dim}); it holds sin and cos halves")
        longest = max(self.token_grid)
        if self.rope_max_seq_len < longest:
            raise ValueError(f"`rope_max_seq_len` must be >= the longest token axis {longest} "
                             f"(got {self.rope_max_seq_len}); raise it")
        if self.max_objects < self.min_objects or self.max_objects > 8:
            raise ValueError(f"`max_objects` must lie in [min_objects={self.min_objects}, 8] "
                             f"(got {self.max_objects})")
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not self.shift > 0:
            raise ValueError(f"`shift` must be a number > 0 (got {self.shift!r}); 1.0 means no shift")
        check_camera_pan(self.camera_pan)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(F, Hs, Ws): the self-attention token grid after 2 x 2 patching."""
        return (self.frames // PATCH_SIZE[0], self.height // PATCH_SIZE[1], self.width // PATCH_SIZE[2])

    @property
    def num_tokens(self) -> int:
        """N = F * Hs * Ws, the self-attention sequence length."""
        f, h, w = self.token_grid
        return f * h * w

    @property
    def num_classes(self) -> int:
        """Conditioning classes (``VIDEO_CLASSES``); label ``num_classes`` is the null class."""
        return len(VIDEO_CLASSES)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one clip in pixels, C = 3 (RGB)."""
        return (3, self.frames, self.height, self.width)

    def clip_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dfsviz.models.videos.make_videos`` for this config's clips."""
        return dict(frames=self.frames, height=self.height, width=self.width, min_objects=self.min_objects,
                    max_objects=self.max_objects, camera_pan=self.camera_pan)

    def latent_grid(self) -> LatentGrid:
        """The token grid as a ``LatentGrid`` (Wan: no text tokens in self-attention)."""
        return LatentGrid(*self.token_grid)

    def transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``diffusers.WanTransformer3DModel`` for this config."""
        return dict(patch_size=PATCH_SIZE, num_attention_heads=self.num_heads, attention_head_dim=self.head_dim,
                    in_channels=3, out_channels=3, text_dim=self.text_dim, freq_dim=self.freq_dim,
                    ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                    rope_max_seq_len=self.rope_max_seq_len, pos_embed_seq_len=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_dict`` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbeddedModelConfig":
        """Rebuild from ``to_dict()`` output; unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"`data` must be a dict from EmbeddedModelConfig.to_dict() (got {type(data).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown embedded-model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, EmbeddedModelConfig] = {
    # The shipped model: 9 x 18 x 32 = 5184 tokens, 41 key blocks of 128.
    "tiny-wan": EmbeddedModelConfig(),
    # Wan2.1 480p's token grid: 21 x 30 x 52 = 32,760 tokens, 256 key blocks of 128, from 21 frames of
    # 60 x 104 pixels; the tiny model's width (8 layers of 3 heads of 64, 5.1 M parameters, 10.2 MB in
    # float16), so that weights and a sample capture fit the repository. Clips hold 3 to 6 objects and
    # a panning camera.
    "medium-wan": EmbeddedModelConfig(name="medium-wan", frames=21, height=60, width=104, num_layers=8, num_heads=3,
                                      head_dim=64, ffn_dim=768, min_objects=3, max_objects=6, camera_pan=0.02),
    # CPU smoke twin: 3 x 8 x 12 = 288 tokens; trains a few steps in seconds.
    "smoke": EmbeddedModelConfig(name="smoke", frames=3, height=16, width=24, num_layers=2, num_heads=2,
                                 head_dim=32, ffn_dim=128, text_dim=16, text_len=2, freq_dim=32,
                                 rope_max_seq_len=32),
}


def get_preset(name: str) -> EmbeddedModelConfig:
    """The preset config called ``name`` (``tiny-wan``, ``medium-wan`` or ``smoke``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown embedded-model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
