"""The latent token grid of a video DiT and its token-index arithmetic.

A video latent of F frames and Hs x Ws patches is flattened frame-major
(raster): the video token at frame ``f``, row ``y``, column ``x`` has video
index ``f * Hs * Ws + y * Ws + x``. Text tokens, when the model puts them in the
same self-attention sequence, sit before the video (CogVideoX, ``text_first``)
or after it (HunyuanVideo).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["LatentGrid"]

_GRID_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# Token positions travel as int32 (the kernels' orders and block indices): N must stay below 2^31.
_MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class LatentGrid:
    """Shape of a video latent in tokens, plus the text tokens sharing its sequence.

    Fields:
        frames: F, latent frames (>= 1).
        height: Hs, patch rows per frame (>= 1).
        width: Ws, patch columns per frame (>= 1).
        text_len: text tokens in the same self-attention sequence (>= 0; 0 for Wan).
        text_first: True when text tokens precede the video (CogVideoX), False when
            they follow it (HunyuanVideo). Ignored when ``text_len`` is 0.
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_first: bool = False

    def __post_init__(self) -> None:
        for field in ("frames", "height", "width"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"`{field}` must be a positive integer (got {value!r}); "
                    "give the latent size in tokens after patching"
                )
        if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"`text_len` must be an integer >= 0 (got {self.text_len!r})")
        if not isinstance(self.text_first, bool):
            raise TypeError(f"`text_first` must be a bool (got {type(self.text_first).__name__})")
        if self.num_tokens > _MAX_TOKENS:
            text = f" and {self.text_len:,} text tokens" if self.text_len else ""
            raise ValueError(
                f"grid {self.frames}x{self.height}x{self.width}{text} has {self.num_tokens:,} tokens, more than "
                f"{_MAX_TOKENS:,} (2^31 - 1), the most that 32-bit token positions index; HunyuanVideo 720p x 129 "
                "has 119,056: give the latent size in tokens after patching"
            )

    @classmethod
    def parse(cls, spec: str, text_len: int = 0, text_first: bool = False) -> "LatentGrid":
        """Build a grid from ``"FxHxW"``, e.g. ``"21x45x80"``."""
        match = _GRID_RE.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(
                f"`grid` must look like FRAMESxHEIGHTxWIDTH, e.g. 21x45x80 (got {spec!r})"
            )
        f, h, w = (int(g) for g in match.groups())
        return cls(f, h, w, text_len=text_len, text_first=text_first)

    @property
    def name(self) -> str:
        """Self-describing key, e.g. ``f21h45w80`` or ``f33h45w80t256`` (``T256`` when text first)."""
        base = f"f{self.frames}h{self.height}w{self.width}"
        if self.text_len:
            base += f"{'T' if self.text_first else 't'}{self.text_len}"
        return base

    @property
    def frame_tokens(self) -> int:
        """Tokens per latent frame, Hs * Ws."""
        return self.height * self.width

    @property
    def num_video(self) -> int:
        """Video tokens, F * Hs * Ws."""
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """All tokens of the sequence, N = video + text."""
        return self.num_video + self.text_len

    @property
    def video_start(self) -> int:
        """Sequence position of the first video token."""
        return self.text_len if self.text_first else 0

    @property
    def video_slice(self) -> slice:
        """Sequence positions of the video tokens."""
        return slice(self.video_start, self.video_start + self.num_video)

    @property
    def text_slice(self) -> slice:
        """Sequence positions of the text tokens (empty when there is no text)."""
        if self.text_first:
            return slice(0, self.text_len)
        return slice(self.num_video, self.num_video + self.text_len)

    def video_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(frame, row, column) of every video token in raster order: int64 [F*Hs*Ws, 3]."""
        idx = torch.arange(self.num_video, device=device)
        f = idx // self.frame_tokens
        rem = idx % self.frame_tokens
        return torch.stack((f, rem // self.width, rem % self.width), dim=1)

    def video_index(self, frame: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Raster video index of (frame, row, column) coordinates (any matching shapes)."""
        return (frame * self.height + row) * self.width + col

    def check_tokens(self, n: int, argument: str = "N") -> None:
        """Raise a ValueError unless a sequence of ``n`` tokens matches this grid."""
        if n != self.num_tokens:
            raise ValueError(
                f"`{argument}` = {n} tokens does not match grid {self.frames}x{self.height}x{self.width}"
                f" with {self.text_len} text tokens (expects {self.num_tokens}); pass the grid the"
                " latent was patched to"
            )
