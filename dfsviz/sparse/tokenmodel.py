"""The token model of docs/theory.md: synthetic queries and keys whose factors are set, not measured.

Tokens sit on a (frames, rows, cols) latent grid and belong to semantic classes:

- class 0 is the background;
- classes 1 .. R are R *regions*, axis-aligned rectangles (objects) that move over the
  frames with constant speed ``speed`` (tokens per frame) in a random direction and
  bounce off the frame borders; a later region covers an earlier one where they overlap;
- class R + 1 holds the text tokens, when the grid has any.

For each head, keys and queries are

    k_j = c^k_{class(j)} + a * phi(pos_j) + e_j,      e_j ~ N(0, delta^2 I_D)
    q_i = c^q_{class(i)} + a * phi(pos_i) + e'_i,     e'_i ~ N(0, delta^2 I_D)

with class centres c^k_c ~ N(0, s^2 I_D) (s = ``centre_spread``) and query centres
c^q_c = rho c^k_c + sqrt(1 - rho^2) z_c, z_c ~ N(0, s^2 I_D) (rho = ``qk_correlation``),
so a query's logit against keys of its own class is about rho s^2 sqrt(D) larger than
against other classes: attention concentrates within a region, and s sets the gap.
phi is a smooth positional feature map, random Fourier features of (frame, row, col)
scaled by 1 / ``length_scale``: phi(p)_m = sqrt(2) cos(w_m . p + b_m), w_m ~ N(0, I_3 /
length_scale^2), b_m ~ U[0, 2 pi), so that phi(p) . phi(p') / D ~ exp(-|p - p'|^2 /
(2 length_scale^2)): nearby tokens attend to each other more, by about a^2 sqrt(D) in the
logit (a = ``locality``). Text tokens have phi = 0. delta sets the noise, hence the
diversities r and J; the region layout decides how much raster blocks mix classes
compared with Hilbert blocks.

Everything is drawn from one ``torch.Generator`` seeded with ``seed`` in float64 on the
CPU and then cast, so a config always gives the same tensors, whatever the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dfsviz.sparse._validate import check_int
from dfsviz.sparse.grid import LatentGrid

__all__ = ["TokenModelConfig", "sample_qk", "token_classes"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Region rectangles span this fraction range of the frame height / width: large enough to
# fill several 128-token blocks on Wan-size grids, small enough that several fit in a frame.
_REGION_FRACTION = (0.2, 0.5)


def _check_real(name: str, value: object, low: float, high: float = math.inf, strict_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if strict_low else f">= {low}"
        upper = f" and <= {high}" if math.isfinite(high) else ""
        raise ValueError(f"`{name}` must be a finite number {bound}{upper} (got {value!r})")


@dataclass(frozen=True)
class TokenModelConfig:
    """Parameters of the token model (see the module docstring for the formulas).

    Fields:
        grid: latent grid (frames, rows, cols, text tokens); N = grid.num_tokens.
        heads: H, heads drawn independently (>= 1).
        head_dim: D (>= 1).
        num_regions: R, moving regions besides the background (>= 0).
        delta: noise standard deviation per coordinate (>= 0); sets the diversities r, J.
        centre_spread: s, standard deviation of the class-centre coordinates (>= 0); sets the gap.
        locality: a, amplitude of the positional features (>= 0); 0 turns locality off.
        length_scale: correlation length of the positional features, in tokens (> 0).
        speed: region motion in tokens per frame (>= 0); 0 keeps regions still.
        qk_correlation: rho in [-1, 1], correlation of a class's query and key centres.
        seed: seed of the generator (>= 0).
        dtype: dtype of the returned q, k (float16, bfloat16, float32 or float64).
    """

    grid: LatentGrid
    heads: int = 2
    head_dim: int = 64
    num_regions: int = 4
    delta: float = 0.3
    centre_spread: float = 1.5
    locality: float = 1.0
    length_scale: float = 4.0
    speed: float = 1.0
    qk_correlation: float = 0.8
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.grid, LatentGrid):
            raise TypeError(
                f"`grid` must be a LatentGrid (got {type(self.grid).__name__}); use LatentGrid.parse('13x24x40')"
            )
        check_int(self.heads, "heads", 1)
        check_int(self.head_dim, "head_dim", 1)
        check_int(self.num_regions, "num_regions", 0)
        check_int(self.seed, "seed", 0)
        _check_real("delta", self.delta, 0.0)
        _check_real("centre_spread", self.centre_spread, 0.0)
        _check_real("locality", self.locality, 0.0)
        _check_real("length_scale", self.length_scale, 0.0, strict_low=True)
        _check_real("speed", self.speed, 0.0)
        _check_real("qk_correlation", self.qk_correlation, -1.0, 1.0)
        if self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be torch.float16, bfloat16, float32 or float64 (got {self.dtype!r})")

    @property
    def num_classes(self) -> int:
        """Classes of the layout: background, the regions, and text when the grid has any."""
        return 1 + self.num_regions + (1 if self.grid.text_len else 0)

    @property
    def name(self) -> str:
        """Self-describing key, e.g. ``tokenmodel_f13h24w40_h2d64_r4_delta0.3_s1.5_a1_l4_v1_rho0.8_seed0``."""
        return (
            f"tokenmodel_{self.grid.name}_h{self.heads}d{self.head_dim}_r{self.num_regions}"
            f"_delta{self.delta:g}_s{self.centre_spread:g}_a{self.locality:g}_l{self.length_scale:g}"
            f"_v{self.speed:g}_rho{self.qk_correlation:g}_seed{self.seed}"
        )


def _reflect(p: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Bounce a coordinate inside [0, span] (a triangle wave); span 0 pins it at 0."""
    period = 2.0 * span
    t = torch.remainder(p, period.clamp_min(1e-12))
    return torch.where(span > 0, span - (t - span).abs(), torch.zeros_like(p))


def _region_labels(config: TokenModelConfig, gen: torch.Generator) -> torch.Tensor:
    """int64 [Nv]: class of each video token in raster order (0 background, 1..R regions)."""
    g = config.grid
    labels = torch.zeros(g.frames, g.height, g.width, dtype=torch.int64)
    if config.num_regions == 0:
        return labels.reshape(-1)
    r = config.num_regions
    lo, hi = _REGION_FRACTION
    frame = torch.tensor([g.height, g.width], dtype=torch.float64)
    size = (lo + (hi - lo) * torch.rand(r, 2, generator=gen, dtype=torch.float64)) * frame  # [R, 2]
    span = (frame - size).clamp_min(0)
    start = torch.rand(r, 2, generator=gen, dtype=torch.float64) * span
    angle = 2 * math.pi * torch.rand(r, generator=gen, dtype=torch.float64)
    velocity = config.speed * torch.stack((torch.sin(angle), torch.cos(angle)), dim=1)  # rows, cols per frame
    rows = torch.arange(g.height, dtype=torch.float64) + 0.5  # token centres
    cols = torch.arange(g.width, dtype=torch.float64) + 0.5
    for f in range(g.frames):
        corner = _reflect(start + velocity * f, span)  # [R, 2]
        for i in range(r):  # later regions occlude earlier ones
            in_rows = (rows >= corner[i, 0]) & (rows < corner[i, 0] + size[i, 0])
            in_cols = (cols >= corner[i, 1]) & (cols < corner[i, 1] + size[i, 1])
            labels[f][in_rows[:, None] & in_cols[None, :]] = i + 1
    return labels.reshape(-1)


def _sequence(grid: LatentGrid, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Place video rows and text rows (along dim 0) in the grid's sequence order."""
    parts = (text, video) if grid.text_first else (video, text)
    return torch.cat(parts, dim=0)


def token_classes(config: TokenModelConfig) -> torch.Tensor:
    """Class of every token in sequence order (raster video, text where the grid puts it).

    Returns:
        int64 [N]: 0 background, 1 .. R regions, R + 1 text. The same layout
        :func:`sample_qk` draws Q/K from (the layout uses the generator first).
    """
    if not isinstance(config, TokenModelConfig):
        raise TypeError(f"`config` must be a TokenModelConfig (got {type(config).__name__})")
    gen = torch.Generator().manual_seed(config.seed)
    video = _region_labels(config, gen)
    text = torch.full((config.grid.text_len,), config.num_regions + 1, dtype=torch.int64)
    return _sequence(config.grid, video, text)


def sample_qk(
    config: TokenModelConfig,
    labels: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw queries and keys from the token model, in raster sequence order.

    Args:
        config: :class:`TokenModelConfig`.
        labels: optional int64 [N] class of every token (values >= 0) replacing the
            moving-region layout of :func:`token_classes`, for controlled layouts such as
            one class per block. Centres are drawn for max(labels) + 1 classes.
        device: where to put the result (drawn on the CPU, so results are device-independent).

    Returns:
        (q, k), each [1, H, N, D] in ``config.dtype``, N = config.grid.num_tokens, tokens in
        raster order (apply a ``TokenOrder`` to study another order). A draw that
        ``config.dtype`` cannot hold (float16 past 65504) raises ValueError.
    """
    if not isinstance(config, TokenModelConfig):
        raise TypeError(f"`config` must be a TokenModelConfig (got {type(config).__name__})")
    grid = config.grid
    n, d, h = grid.num_tokens, config.head_dim, config.heads
    gen = torch.Generator().manual_seed(config.seed)
    # The layout is drawn first, so token_classes(config) reproduces it exactly.
    video_classes = _region_labels(config, gen)
    if labels is None:
        text = torch.full((grid.text_len,), config.num_regions + 1, dtype=torch.int64)
        classes = _sequence(grid, video_classes, text)
    else:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"`labels` must be an int64 tensor [N] (got {got}); use labels.long()")
        if tuple(labels.shape) != (n,):
            raise ValueError(f"`labels` must have shape [N] = ({n},) for grid {grid.name} (got {tuple(labels.shape)})")
        if int(labels.min()) < 0:
            raise ValueError(f"`labels` must be >= 0 (got minimum {int(labels.min())}); classes are 0, 1, 2, ...")
        classes = labels.cpu()
    num_classes = int(classes.max()) + 1
    s, rho, a = config.centre_spread, config.qk_correlation, config.locality
    coords = grid.video_coords().to(torch.float64)  # [Nv, 3] (frame, row, col)
    qs, ks = [], []
    for _ in range(h):
        c_k = s * torch.randn(num_classes, d, generator=gen, dtype=torch.float64)
        z = s * torch.randn(num_classes, d, generator=gen, dtype=torch.float64)
        c_q = rho * c_k + math.sqrt(max(0.0, 1.0 - rho * rho)) * z
        freqs = torch.randn(d, 3, generator=gen, dtype=torch.float64) / config.length_scale
        phase = 2 * math.pi * torch.rand(d, generator=gen, dtype=torch.float64)
        phi_video = math.sqrt(2.0) * torch.cos(coords @ freqs.T + phase)  # [Nv, D]
        phi = _sequence(grid, phi_video, torch.zeros(grid.text_len, d, dtype=torch.float64))
        noise_k = config.delta * torch.randn(n, d, generator=gen, dtype=torch.float64)
        noise_q = config.delta * torch.randn(n, d, generator=gen, dtype=torch.float64)
        ks.append(c_k[classes] + a * phi + noise_k)
        qs.append(c_q[classes] + a * phi + noise_q)
    q64, k64 = torch.stack(qs).unsqueeze(0), torch.stack(ks).unsqueeze(0)
    # A cast past the dtype's range would hand inf to every statistic downstream.
    largest = max(float(q64.abs().max()), float(k64.abs().max()))
    limit = torch.finfo(config.dtype).max
    if largest > limit:
        raise ValueError(
            f"`dtype` {config.dtype} cannot hold the drawn q and k (largest |value| {largest:.4g} > {limit:.4g}); "
            "lower `centre_spread`, `locality` or `delta`, or use torch.float32"
        )
    return q64.to(device=device, dtype=config.dtype), k64.to(device=device, dtype=config.dtype)
