"""8-bit map storage (``map_dtype = "uint8"``): each row of a map as 256 levels.

A stored row u of a map X (one query block) is ``code`` uint8 [Mk] and ``(offset_u, scale_u)``
float32, and reads back as

    X_uv = offset_u + scale_u * code_uv        (computed in float32)

The codes are chosen per quantity (``docs/format.md``, "8-bit maps"):

* ``m``: offset 0, scale 1 / K_u with K_u = floor(255 / max_v m_uv), and the codes sum to K_u
  (each m_uv K_u rounded down, then the rows' missing units given to the largest remainders):
  rows still sum to 1, each entry is within one step 1 / K_u of its value, and the recall of
  the full mask stays 1.
* ``L`` and ``scores``: offset = the row's minimum, scale = its range / 255, rounded to the
  nearest level (within half a step).
* ``r`` and ``J``: as L, rounded up, and r also by L's largest rounding in the row: the
  bounds of docs/theory.md computed from the stored L, r, J are then at most those of the exact
  values (Bound 2 keeps ``L - r`` below and ``L + r + J`` above the exact terms; Bound 3's gap
  moves by at most twice L's rounding, which ``2 r`` absorbs), so they remain lower bounds.

A linear code for m was chosen over a log-domain one by the recall error it leaves on the
shipped sample (about half, docs/format.md): it is finest where the mass is, in the large
entries a mask keeps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decode", "encode_maps"]

LEVELS = 255  # the largest code


def decode(codes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """float32 [..., Mq, Mk] from uint8 ``codes`` [..., Mq, Mk] and float32 ``affine``
    [..., Mq, 2] (offset, scale): offset + scale * code."""
    affine = np.asarray(affine, dtype=np.float32)
    return affine[..., 0:1] + affine[..., 1:2] * np.asarray(codes).astype(np.float32)


def _scale(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """float32 [Mq, 1]: a step that takes ``low`` to at least ``high`` in LEVELS steps in float32
    arithmetic (a whisker above (high - low) / LEVELS; 0 for a constant row)."""
    span = high.astype(np.float64) - low.astype(np.float64)
    # the float32 sum low + LEVELS * scale loses up to an ulp of the larger magnitude
    ulp = np.spacing(np.maximum(np.abs(low), np.abs(high)).astype(np.float32)).astype(np.float64)
    scale = np.where(span > 0, (span + 4 * ulp) / LEVELS, 0.0)
    return np.nextafter(scale.astype(np.float32), np.float32(np.inf)) * (span > 0)


def _nearest(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, high = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    scale = _scale(low, high)
    steps = np.divide(x.astype(np.float64) - low, scale, out=np.zeros(x.shape), where=scale > 0)
    return np.clip(np.rint(steps), 0, LEVELS).astype(np.uint8), np.concatenate([low, scale], axis=-1)


def _upward(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of float64 ``target`` [Mq, Mk] whose decoded values (float32, as :func:`decode`)
    are at least ``target``, by at most one step."""
    least, most = target.min(axis=-1, keepdims=True), target.max(axis=-1, keepdims=True)
    low, high = least.astype(np.float32), most.astype(np.float32)
    low = np.where(low > least, np.nextafter(low, np.float32(-np.inf)), low)  # float32 bounds outside the row
    high = np.where(high < most, np.nextafter(high, np.float32(np.inf)), high)
    scale = _scale(low, high)
    steps = np.divide(target - low, scale, out=np.zeros(target.shape), where=scale > 0)
    codes = np.clip(np.ceil(steps), 0, LEVELS)
    affine = np.concatenate([low, scale], axis=-1)
    short = decode(codes, affine) < target  # the float32 decode rounded below: one level more
    return np.clip(codes + short, 0, LEVELS).astype(np.uint8), affine


def _mass(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m [Mq, Mk] as codes summing to K_u per row, with scale 1 / K_u (largest remainders)."""
    row = m.astype(np.float64)
    row = row / row.sum(axis=-1, keepdims=True)  # the float32 row's sum misses 1 by its rounding
    peak = row.max(axis=-1, keepdims=True)
    k = np.floor(LEVELS / peak)  # peak * K <= 255
    exact = row * k
    codes = np.floor(exact)
    remainder = exact - codes
    # sum(remainder) = K - sum(codes) < Mk, and more entries than that have a remainder > 0
    missing = np.rint(k[:, 0] - codes.sum(axis=-1)).astype(np.int64)
    for u in np.flatnonzero(missing > 0):
        order = np.argsort(-remainder[u], kind="stable")
        codes[u, order[: missing[u]]] += 1
    affine = np.concatenate([np.zeros_like(k), 1.0 / k], axis=-1).astype(np.float32)
    return codes.astype(np.uint8), affine


def encode_maps(maps: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """uint8 codes [Mq, Mk] and float32 affine [Mq, 2] of each ``(name, float32 map [Mq, Mk])``
    of one (layer, branch, order, head): names ``m``, ``L``, ``r``, ``J`` and ``scores``. r is
    coded upward by L's largest rounding in the row, so it comes with L."""
    big_l = next((x for name, x in maps if name == "L"), None)
    coded_l = None if big_l is None else _nearest(big_l)
    out = []
    for name, x in maps:
        if name == "m":
            out.append(_mass(x))
        elif name == "L":
            out.append(coded_l)
        elif name == "scores":
            out.append(_nearest(x))
        elif name == "J":
            out.append(_upward(x.astype(np.float64)))
        elif name == "r":
            if coded_l is None:
                raise ValueError("r is coded with L's rounding: pass L with it")
            shift = np.abs(decode(*coded_l).astype(np.float64) - big_l.astype(np.float64)).max(axis=-1, keepdims=True)
            out.append(_upward(x.astype(np.float64) + shift))
        else:
            raise ValueError(f"`{name}` is not a map of 8-bit storage; maps are m, L, r, J and scores")
    return out
