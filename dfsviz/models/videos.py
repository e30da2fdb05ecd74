"""Deterministic procedural videos: textured objects moving over textured backgrounds.

The embedded model learns from these clips (pixel space, no VAE). Each class fixes
one shape, one colour and one motion; a clip holds several objects of its class
(sizes, phases, speeds, textures and colour shades differ) drawn back to front, so
objects occlude each other, over a background of two drifting colour gratings.
With ``camera_pan`` > 0 the camera also pans at a steady speed and heading drawn
per clip, so the whole scene (objects and background) slides across the frame.

Every random number is drawn on the CPU from ``torch.Generator().manual_seed(seed)``
before anything is moved to ``device``, so one seed gives the same clip parameters
on every machine; rendering is plain float32 arithmetic.

Coordinates: y runs over [0, 1] from the top row to the bottom row, x over
[0, W / H]; lengths and speeds are in units of the frame height (per frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dfsviz.sparse._validate import check_int

__all__ = [
    "COLOURS",
    "MOTIONS",
    "SHAPES",
    "VIDEO_CLASSES",
    "MAX_CAMERA_PAN",
    "VideoClass",
    "check_camera_pan",
    "class_names",
    "class_table",
    "make_videos",
    "sample_labels",
]

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring")
MOTIONS: tuple[str, ...] = ("translate", "orbit", "bounce", "grow")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.80, 0.25),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "magenta": (0.90, 0.15, 0.85),
}


@dataclass(frozen=True)
class VideoClass:
    """One conditioning class: every object of a clip of this class shares these.

    Fields:
        name: self-describing key, ``f"{colour}_{shape}_{motion}"``.
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS`` (objects jitter around it).
        motion: one of ``MOTIONS``.
    """

    name: str
    shape: str
    colour: str
    motion: str

    def __post_init__(self) -> None:
        for field, allowed in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("motion", MOTIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"`{field}` must be one of {list(allowed)} (got {getattr(self, field)!r})")
        expected = f"{self.colour}_{self.shape}_{self.motion}"
        if self.name != expected:
            raise ValueError(f"`name` must be {expected!r} for this shape, colour and motion (got {self.name!r})")


def _cls(colour: str, shape: str, motion: str) -> VideoClass:
    return VideoClass(f"{colour}_{shape}_{motion}", shape, colour, motion)


# Every shape and every motion appears in two classes, each time with other partners, and
# every class has its own colour, so shape and motion are not implied by each other.
VIDEO_CLASSES: tuple[VideoClass, ...] = (
    _cls("red", "disc", "translate"),
    _cls("green", "square", "orbit"),
    _cls("blue", "triangle", "bounce"),
    _cls("yellow", "ring", "grow"),
    _cls("cyan", "disc", "orbit"),
    _cls("orange", "square", "bounce"),
    _cls("white", "triangle", "grow"),
    _cls("magenta", "ring", "translate"),
)


def class_names() -> list[str]:
    """Class names in label order (label i is ``class_names()[i]``)."""
    return [c.name for c in VIDEO_CLASSES]


def class_table() -> list[dict[str, object]]:
    """JSON-ready class table: one dict per label with label, name, shape, colour (name and RGB), motion."""
    return [
        {"label": i, "name": c.name, "shape": c.shape, "colour": c.colour, "rgb": list(COLOURS[c.colour]),
         "motion": c.motion}
        for i, c in enumerate(VIDEO_CLASSES)
    ]


def sample_labels(batch: int, seed: int) -> torch.Tensor:
    """Uniform class labels, int64 [batch], reproducible for ``seed``."""
    check_int(batch, "batch", 1, "ask for at least one clip")
    check_int(seed, "seed", 0, "use a non-negative seed")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(len(VIDEO_CLASSES), (batch,), generator=gen)


#: Fastest camera pan allowed, in frame heights per frame.
MAX_CAMERA_PAN = 0.1


def check_camera_pan(camera_pan: object) -> None:
    """ValueError unless ``camera_pan`` is a number in [0, MAX_CAMERA_PAN]."""
    if isinstance(camera_pan, bool) or not isinstance(camera_pan, (int, float)) or not (
            0.0 <= camera_pan <= MAX_CAMERA_PAN):
        raise ValueError(f"`camera_pan` must be a speed in [0, {MAX_CAMERA_PAN}] frame heights per frame "
                         f"(got {camera_pan!r}); 0 keeps the camera still")


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _reflect(p: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Fold p into [low, high] as a ball bouncing between two walls (triangle wave)."""
    span = (high - low).clamp_min(1e-6)
    s = torch.remainder(p - low, 2 * span)
    return low + torch.where(s > span, 2 * span - s, s)


def _draw_params(labels: torch.Tensor, frames: int, aspect: float, min_objects: int, max_objects: int,
                 camera_pan: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """All random numbers of a batch, drawn in one fixed order (CPU, float32); the camera's
    come last, so a clip without camera motion draws what it always drew."""
    b, k = labels.shape[0], max_objects
    shape_id = torch.tensor([SHAPES.index(c.shape) for c in VIDEO_CLASSES])[labels]
    motion_id = torch.tensor([MOTIONS.index(c.motion) for c in VIDEO_CLASSES])[labels]
    base_rgb = torch.tensor([COLOURS[c.colour] for c in VIDEO_CLASSES])[labels]          # [B, 3]

    count = torch.randint(min_objects, max_objects + 1, (b,), generator=gen)
    present = (torch.arange(k)[None, :] < count[:, None]).float()                            # [B, K]
    radius = _uniform(gen, (b, k), 0.10, 0.19)
    rgb = (base_rgb[:, None, :] + _uniform(gen, (b, k, 3), -0.12, 0.12)).clamp(0.0, 1.0)
    tex_freq = _uniform(gen, (b, k), 25.0, 45.0)          # radians per height unit: 3-5 stripes per object
    tex_angle = _uniform(gen, (b, k), 0.0, math.pi)
    tex_phase = _uniform(gen, (b, k), 0.0, 2 * math.pi)
    tex_contrast = _uniform(gen, (b, k), 0.25, 0.45)
    spin0 = _uniform(gen, (b, k), 0.0, 2 * math.pi)
    spin_rate = _uniform(gen, (b, k), -0.25, 0.25)          # radians per frame

    t = torch.arange(frames, dtype=torch.float32)[None, None, :]                             # [1, 1, F]
    tc = t - (frames - 1) / 2
    # Centres of motion stay inside the frame so every object is seen most of the clip.
    cy = _uniform(gen, (b, k), 0.3, 0.7)
    cx = _uniform(gen, (b, k), 0.3 * aspect, 0.7 * aspect)
    heading = _uniform(gen, (b, k), 0.0, 2 * math.pi)
    speed = _uniform(gen, (b, k), 0.035, 0.06)
    orbit_r = _uniform(gen, (b, k), 0.15, 0.28)
    orbit_w = _uniform(gen, (b, k), 0.25, 0.45) * torch.where(torch.rand((b, k), generator=gen) < 0.5, -1.0, 1.0)
    orbit_phase = _uniform(gen, (b, k), 0.0, 2 * math.pi)
    bounce_speed = _uniform(gen, (b, k), 0.09, 0.15)
    grow_from = _uniform(gen, (b, k), 0.35, 0.6)
    grow_to = _uniform(gen, (b, k), 1.3, 1.7)

    r = radius[..., None]
    vy, vx = (speed * torch.sin(heading))[..., None], (speed * torch.cos(heading))[..., None]
    translate = (cy[..., None] + vy * tc, cx[..., None] + vx * tc)
    ang = orbit_phase[..., None] + orbit_w[..., None] * t
    orbit = (cy[..., None] + orbit_r[..., None] * torch.sin(ang), cx[..., None] + orbit_r[..., None] * torch.cos(ang))
    by = (bounce_speed * torch.sin(heading))[..., None]
    bx = (bounce_speed * torch.cos(heading))[..., None]
    bounce = (_reflect(cy[..., None] + by * t, r, 1.0 - r), _reflect(cx[..., None] + bx * t, r, aspect - r))
    drift = 0.3 * vy, 0.3 * vx                                   # growing objects drift slowly
    grow = (cy[..., None] + drift[0] * tc, cx[..., None] + drift[1] * tc)
    m = motion_id[:, None, None]
    pos_y = torch.where(m == 0, translate[0], torch.where(m == 1, orbit[0], torch.where(m == 2, bounce[0], grow[0])))
    pos_x = torch.where(m == 0, translate[1], torch.where(m == 1, orbit[1], torch.where(m == 2, bounce[1], grow[1])))
    scale = grow_from[..., None] + (grow_to - grow_from)[..., None] * t / max(frames - 1, 1)
    size = torch.where(m == 3, r * scale, r.expand_as(scale))

    bg_rgb = _uniform(gen, (b, 2, 3), 0.05, 0.55)
    bg_freq = _uniform(gen, (b, 2), 5.0, 14.0)
    bg_angle = _uniform(gen, (b, 2), 0.0, math.pi)
    bg_phase = _uniform(gen, (b, 2), 0.0, 2 * math.pi)
    bg_drift = _uniform(gen, (b, 2), -0.25, 0.25)            # radians per frame: a slow pan
    # Camera offset (height units) at each frame, zero at the middle frame: the scene slides by -offset.
    cam_y = torch.zeros(b, 1, frames)
    cam_x = torch.zeros(b, 1, frames)
    if camera_pan > 0:
        cam_speed = _uniform(gen, (b, 1), 0.5 * camera_pan, camera_pan)[..., None]
        cam_heading = _uniform(gen, (b, 1), 0.0, 2 * math.pi)[..., None]
        cam_y, cam_x = cam_speed * torch.sin(cam_heading) * tc, cam_speed * torch.cos(cam_heading) * tc
        pos_y, pos_x = pos_y - cam_y, pos_x - cam_x
    return dict(cam_y=cam_y[:, 0], cam_x=cam_x[:, 0], shape_id=shape_id, present=present, rgb=rgb, pos_y=pos_y, pos_x=pos_x, size=size,
                spin=spin0[..., None] + spin_rate[..., None] * t, tex_freq=tex_freq, tex_angle=tex_angle,
                tex_phase=tex_phase, tex_contrast=tex_contrast, bg_rgb=bg_rgb, bg_freq=bg_freq,
                bg_angle=bg_angle, bg_phase=bg_phase, bg_drift=bg_drift)


def _shape_distance(shape_id: torch.Tensor, u: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (height units, < 0 inside) of each shape in object-local coordinates."""
    rho = torch.sqrt(u * u + v * v)
    disc = rho - size
    square = torch.maximum(u.abs(), v.abs()) - 0.85 * size        # 0.85: about the disc's area
    # Equilateral triangle as the intersection of three half-planes; inradius size / 2.
    triangle = torch.maximum(u.abs() * (math.sqrt(3) / 2) + v / 2, -v) - size / 2
    ring = (rho - 0.8 * size).abs() - 0.25 * size
    s = shape_id.view(-1, 1, 1, 1)
    return torch.where(s == 0, disc, torch.where(s == 1, square, torch.where(s == 2, triangle, ring)))


def make_videos(labels: torch.Tensor | list[int], *, frames: int, height: int, width: int, seed: int,
                min_objects: int = 2, max_objects: int = 4, camera_pan: float = 0.0,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Render one procedural clip per label.

    Args:
        labels: int [B] class labels in ``[0, len(VIDEO_CLASSES))`` (see ``class_names()``).
        frames, height, width: clip size in pixels (F >= 1, H >= 8, W >= 8).
        seed: >= 0; the same (labels, sizes, seed) always gives the same clips.
        min_objects, max_objects: objects per clip, 1 <= min <= max <= 8 (uniform count).
        camera_pan: fastest camera pan in frame heights per frame, in [0, 0.1]; each clip pans
            at a speed drawn in [camera_pan / 2, camera_pan] with its own heading. 0 (default):
            a still camera, the clips of the tiny model.
        device: where to render (parameters are drawn on the CPU first).

    Returns:
        float32 [B, 3, F, H, W] RGB in [-1, 1].
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype in (torch.bool,) or labels.is_floating_point():
        raise ValueError(f"`labels` must be a non-empty 1-D integer tensor of class labels (got shape "
                         f"{tuple(labels.shape)}, dtype {labels.dtype})")
    labels = labels.to("cpu", torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= len(VIDEO_CLASSES):
        raise ValueError(f"`labels` must lie in [0, {len(VIDEO_CLASSES) - 1}] (got min {int(labels.min())}, "
                         f"max {int(labels.max())}); class_names() lists the classes")
    check_int(frames, "frames", 1, "ask for at least one frame")
    check_int(height, "height", 8, "frames smaller than 8 pixels cannot hold an object")
    check_int(width, "width", 8, "frames smaller than 8 pixels cannot hold an object")
    check_int(seed, "seed", 0, "use a non-negative seed")
    check_int(min_objects, "min_objects", 1, "a clip needs at least one object")
    check_int(max_objects, "max_objects", min_objects, "max_objects must be >= min_objects")
    if max_objects > 8:
        raise ValueError(f"`max_objects` must be <= 8 (got {max_objects}); more objects cover the background")
    check_camera_pan(camera_pan)

    aspect = width / height
    gen = torch.Generator().manual_seed(seed)
    p = {k: v.to(device) for k, v in _draw_params(labels, frames, aspect, min_objects, max_objects, float(camera_pan),
                                                   gen).items()}
    dev = p["present"].device
    ys = ((torch.arange(height, device=dev, dtype=torch.float32) + 0.5) / height).view(1, 1, height, 1)
    xs = ((torch.arange(width, device=dev, dtype=torch.float32) + 0.5) / height).view(1, 1, 1, width)
    t = torch.arange(frames, device=dev, dtype=torch.float32).view(1, frames, 1, 1)

    # Background: the product of two drifting gratings mixes two colours, seen through the camera.
    world_y = ys + p["cam_y"].view(-1, frames, 1, 1)
    world_x = xs + p["cam_x"].view(-1, frames, 1, 1)
    gratings = []
    for j in range(2):
        ky = p["bg_freq"][:, j] * torch.sin(p["bg_angle"][:, j])
        kx = p["bg_freq"][:, j] * torch.cos(p["bg_angle"][:, j])
        arg = (ky.view(-1, 1, 1, 1) * world_y + kx.view(-1, 1, 1, 1) * world_x + p["bg_phase"][:, j].view(-1, 1, 1, 1)
               + p["bg_drift"][:, j].view(-1, 1, 1, 1) * t)
        gratings.append(torch.sin(arg))
    mix = (0.5 + 0.5 * gratings[0] * gratings[1])[:, None]                                # [B, 1, F, H, W]
    c0, c1 = p["bg_rgb"][:, 0].view(-1, 3, 1, 1, 1), p["bg_rgb"][:, 1].view(-1, 3, 1, 1, 1)
    img = c0 * (1 - mix) + c1 * mix

    pixel = 1.0 / height
    for k in range(p["present"].shape[1]):            # later objects are drawn on top: occlusion
        dy = ys - p["pos_y"][:, k].view(-1, frames, 1, 1)
        dx = xs - p["pos_x"][:, k].view(-1, frames, 1, 1)
        cos, sin = torch.cos(p["spin"][:, k]).view(-1, frames, 1, 1), torch.sin(p["spin"][:, k]).view(-1, frames, 1, 1)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy                                 # object-local axes
        size = p["size"][:, k].view(-1, frames, 1, 1)
        dist = _shape_distance(p["shape_id"], u, v, size)
        # A one-pixel linear ramp anti-aliases the edge.
        alpha = (0.5 - dist / pixel).clamp(0.0, 1.0) * p["present"][:, k].view(-1, 1, 1, 1)
        ta = p["tex_angle"][:, k].view(-1, 1, 1, 1)
        stripes = torch.sin(p["tex_freq"][:, k].view(-1, 1, 1, 1) * (torch.cos(ta) * u + torch.sin(ta) * v)
                            + p["tex_phase"][:, k].view(-1, 1, 1, 1))
        shade = 1.0 - p["tex_contrast"][:, k].view(-1, 1, 1, 1) * (0.5 + 0.5 * stripes)
        colour = p["rgb"][:, k].view(-1, 3, 1, 1, 1) * shade[:, None]
        a = alpha[:, None]
        img = img * (1 - a) + colour * a
    return img * 2.0 - 1.0
