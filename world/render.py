"""Render 32x32 RGB images of the world's concepts from their hidden attributes.

Vectorised numpy over a batch: every image is a silhouette (shape family and attached
parts) filled with oriented stripes (orientation, period), over a random
background, with random colours, position, scale, tilt, clutter, lighting and noise.
Only the silhouette and the stripes carry meaning; everything else is drawn per image
independently of the class.
"""
from __future__ import annotations

import numpy as np

from semguard.world.attributes import ORIENTATION_DEG, PARTS, PERIOD_PX, SHAPES, ConceptAttributes

_CHUNK = 2048  # images per vectorised chunk: bounds peak memory at ~100 MB float32


def _hypot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


# Signed depth inside each silhouette, in object units (> 0 inside); u, v: (n, H, W), a: (n, 1, 1).
_SHAPE_DEPTH = {
    "round": lambda u, v, a: 0.95 - _hypot(u / a, v * a),
    "spiky": lambda u, v, a: 0.62 + 0.33 * np.cos(5.0 * np.arctan2(v, u)) - _hypot(u, v),
    "boxy": lambda u, v, a: 0.8 - np.maximum(np.abs(u) / a, np.abs(v) * a),
    "hollow": lambda u, v, a: np.minimum(_hypot(u, v) - 0.5, 0.98 - _hypot(u, v)),
    "crossed": lambda u, v, a: np.minimum(np.maximum(0.32 - np.abs(u), 0.32 - np.abs(v)),
                                          0.95 - np.maximum(np.abs(u), np.abs(v))),
}
# Parts attached to the body: a head above, two legs below, a tail to the right.
_PART_DEPTH = {
    "plain": lambda u, v: np.full_like(u, -10.0),
    "headed": lambda u, v: 0.4 - _hypot(u, v + 1.1),
    "legged": lambda u, v: np.minimum(0.14 - np.abs(np.abs(u) - 0.45), np.minimum(v - 0.5, 1.5 - v)),
    "tailed": lambda u, v: np.minimum(0.14 - np.abs(v), np.minimum(u - 0.5, 1.6 - u)),
}


def _silhouette_depth(shape_k: np.ndarray, part_k: np.ndarray, u: np.ndarray, v: np.ndarray,
                      aspect: np.ndarray) -> np.ndarray:
    """(N, H, W) signed depth inside body-or-parts; each family computed on its own images only."""
    out = np.empty_like(u)
    for k, name in enumerate(SHAPES):
        sel = shape_k == k
        if sel.any():
            out[sel] = _SHAPE_DEPTH[name](u[sel], v[sel], aspect[sel])
    for k, name in enumerate(PARTS):
        sel = part_k == k
        if sel.any() and name != "plain":
            out[sel] = np.maximum(out[sel], _PART_DEPTH[name](u[sel], v[sel]))
    return out


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    d = rng.normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _render_chunk(attrs: list[ConceptAttributes], labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    shape_k = np.array([SHAPES.index(attrs[c].shape) for c in labels])
    part_k = np.array([PARTS.index(attrs[c].parts) for c in labels])
    angle = np.deg2rad([ORIENTATION_DEG[attrs[c].orientation] for c in labels])
    period = np.array([PERIOD_PX[attrs[c].period] for c in labels])
    col = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]  # noqa: E731  (N,) -> (N, 1, 1)

    half = size / 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) - (half - 0.5)  # pixel coords about the centre
    # Nuisance pose: position, scale, small tilt (things have an upright pose, as in photos).
    cx, cy = col(rng.uniform(-0.15, 0.15, n) * half), col(rng.uniform(-0.15, 0.15, n) * half)
    radius = col(rng.uniform(0.42, 0.6, n) * half)  # object radius in pixels
    tilt = rng.normal(0, np.deg2rad(8), n)
    dx, dy = xs - cx, ys - cy  # (N, H, W)
    ct, st = col(np.cos(tilt)), col(np.sin(tilt))
    u, v = (dx * ct + dy * st) / radius, (-dx * st + dy * ct) / radius
    aspect = col(rng.uniform(0.8, 1.25, n))
    depth = _silhouette_depth(shape_k, part_k, u, v, aspect)
    mask = np.clip(0.5 + depth * radius, 0.0, 1.0)  # anti-aliased over ~1 pixel

    # Texture axis: the class's orientation and period, jittered, in pixels (moves with the object).
    ang = angle + tilt + rng.normal(0, np.deg2rad(6), n)
    per = col(period * rng.uniform(0.9, 1.1, n))
    ca, sa = col(np.cos(ang)), col(np.sin(ang))
    tex = np.sin(2 * np.pi * (dx * ca + dy * sa) / per + col(rng.uniform(0, 2 * np.pi, n)))  # (N, H, W)

    # Colours: object base colour and texture contrast direction are random per image.
    base = rng.uniform(0.15, 0.85, (n, 3))
    contrast = rng.uniform(0.35, 0.6, (n, 1)) * _unit(rng, n)
    obj = base[:, :, None, None] + 0.5 * contrast[:, :, None, None] * tex[:, None]  # (N, 3, H, W)
    bg = _background(rng, n, xs, ys)
    img = bg * (1 - mask[:, None]) + obj * mask[:, None]
    img = _clutter(rng, img, xs, ys)
    # Lighting and sensor: contrast, brightness, per-channel tint, noise.
    gain = rng.uniform(0.75, 1.2, (n, 1, 1, 1))
    shift = rng.uniform(-0.1, 0.1, (n, 1, 1, 1)) + rng.uniform(-0.06, 0.06, (n, 3, 1, 1))
    img = (img - 0.5) * gain + 0.5 + shift
    img = img + rng.normal(0, 1, img.shape) * rng.uniform(0.01, 0.04, (n, 1, 1, 1))
    img = np.clip(img, 0.0, 1.0).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    return np.round(img * 255).astype(np.uint8)


def _background(rng: np.random.Generator, n: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(N, 3, H, W): random colour, a random gradient, and weak random stripes (a decoy texture)."""
    size = xs.shape[0]
    colour = rng.uniform(0.05, 0.95, (n, 3, 1, 1))
    g_ang = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    ramp = (xs * np.cos(g_ang) + ys * np.sin(g_ang)) / size  # (N, H, W) in [-0.7, 0.7]
    grad = rng.uniform(0, 0.3, (n, 1, 1, 1)) * _unit(rng, n)[:, :, None, None] * ramp[:, None]
    s_ang = rng.uniform(0, np.pi, n)[:, None, None]
    s_per = rng.uniform(3.0, 10.0, n)[:, None, None]
    stripes = np.sin(2 * np.pi * (xs * np.cos(s_ang) + ys * np.sin(s_ang)) / s_per + rng.uniform(0, 6.3, (n, 1, 1)))
    amp = rng.uniform(0, 0.1, (n, 1, 1, 1)) * (rng.random((n, 1, 1, 1)) < 0.5)
    return colour + grad + amp * stripes[:, None]


def _clutter(rng: np.random.Generator, img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Paint 0-3 small discs or squares of random colour at random places (occluders)."""
    n, size = img.shape[0], xs.shape[0]
    for _ in range(3):
        present = rng.random(n) < 0.5
        cx = rng.uniform(-0.5, 0.5, n)[:, None, None] * size
        cy = rng.uniform(-0.5, 0.5, n)[:, None, None] * size
        r = rng.uniform(1.2, 3.5, n)[:, None, None]
        square = (rng.random(n) < 0.5)[:, None, None]
        dist = np.where(square, np.maximum(np.abs(xs - cx), np.abs(ys - cy)), np.hypot(xs - cx, ys - cy))
        m = np.clip(r + 0.5 - dist, 0, 1) * present[:, None, None]
        colour = rng.uniform(0, 1, (n, 3, 1, 1))
        img = img * (1 - m[:, None]) + colour * m[:, None]
    return img


def render(attrs: list[ConceptAttributes], labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Images of the given concepts.

    attrs: per class index, its attributes; labels: (N,) int class indices into attrs.
    Returns (N, size, size, 3) uint8. Deterministic given rng's state.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= len(attrs))):
        raise ValueError(f"labels must be 1-D ints in [0, {len(attrs)}), got shape {labels.shape}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    out = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        out[start : start + _CHUNK] = _render_chunk(attrs, labels[start : start + _CHUNK], size, rng)
    return out
