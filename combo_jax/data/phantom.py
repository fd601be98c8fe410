"""The embedded default dataset: procedural multi-organ scans in 2D and 3D, deterministic per seed.

Each case is a body outline holding six organs whose sizes span two orders of magnitude, like an abdominal
CT slice or volume: a large "liver" (about 10% of the voxels) down to an "adrenal" at or under 0.1%. Shape,
size, position and intensity vary per case; organ intensities overlap each other and the surrounding tissue,
so no threshold separates them; every case gets textured tissue, Gaussian noise and a smooth multiplicative
bias field. Images are float32 ``(*spatial, 1)`` (channels-last), label maps int32 ``(*spatial)`` with
0 = background (everything that is not an organ).

    >>> image, labels = make_case(seed=0, index=3, shape=(128, 128))
    >>> class_frequencies(seed=0, shape=(128, 128), num_cases=16)  # fraction of voxels per class
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Organ(NamedTuple):
    name: str
    center: tuple[float, float, float]  # (axial, left-right, front-back) in body-relative units [-1, 1]
    radii: tuple[float, float, float]  # semi-axes, body-relative
    intensity: float  # mean intensity; body tissue is 0.0


# Centres and radii are relative to the body ellipse (axial extent [-1, 1] in 3D). The in-plane radii set each
# organ's share of a 2D slice: about 10%, 3%, 1%, 1%, 0.3% and 0.08%; the axial radii set the 3D shares:
# about 10%, 2%, 0.5%, 0.5%, 0.1% and 0.03% (see `class_frequencies`).
ORGANS = (
    Organ("liver", (0.0, -0.36, -0.05), (1.5, 0.475, 0.55), 0.55),
    Organ("spleen", (0.1, 0.52, 0.15), (1.0, 0.25, 0.3), 0.75),
    Organ("kidney_right", (-0.1, -0.34, 0.55), (0.8, 0.155, 0.18), 0.95),
    Organ("kidney_left", (-0.1, 0.36, 0.55), (0.8, 0.155, 0.18), 0.95),
    Organ("pancreas", (0.0, 0.08, 0.2), (0.6, 0.24, 0.043), 0.5),
    Organ("adrenal", (0.45, -0.2, 0.45), (0.6, 0.046, 0.046), 0.65),
)
CLASS_NAMES = ("background",) + tuple(o.name for o in ORGANS)
NUM_CLASSES = len(CLASS_NAMES)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Zero-mean, unit-std noise that is smooth over about `scale` voxels (coarse grid, linear upsampling)."""
    coarse = [max(2, s // scale + 2) for s in shape]
    grid = rng.standard_normal(coarse)
    out = grid
    for axis, size in enumerate(shape):
        pos = np.linspace(0, coarse[axis] - 1, size)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, coarse[axis] - 1)
        frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    out = out - out.mean()
    return out / (out.std() + 1e-8)


def make_case(seed: int, index: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One case: (image (*shape, 1) float32, labels (*shape) int32). Same (seed, index, shape), same case."""
    if len(shape) not in (2, 3) or min(shape) < 16:
        raise ValueError(f"phantom shape must be 2D or 3D with every side >= 16, got {shape}")
    rng = np.random.default_rng([seed, index, len(shape)])
    ndim = len(shape)
    # Normalized coordinates in [-1, 1] per axis; 2D cases are an axial slice (axial coordinate 0).
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    if ndim == 2:
        coords = [np.zeros_like(grids[0]), grids[1], grids[0]]  # the axial offset is set per organ below
    else:
        coords = [grids[0], grids[2], grids[1]]  # (axial, left-right, front-back)

    # Body: an ellipse (elliptic cylinder in 3D) with jittered size and a wobbly outline.
    body_r = (0.82 * rng.uniform(0.92, 1.05), 0.68 * rng.uniform(0.9, 1.05))
    body_c = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    wobble = 0.04 * _smooth_noise(rng, shape, max(shape) // 4)
    body_d = ((coords[1] - body_c[0]) / body_r[0]) ** 2 + ((coords[2] - body_c[1]) / body_r[1]) ** 2
    body = body_d + wobble < 1.0

    labels = np.zeros(shape, np.int32)
    image = np.where(body, 0.0, -1.0).astype(np.float32)
    fat = body & (body_d + wobble > 0.8)  # a brighter rim under the skin
    image[fat] = 0.35
    means = {}
    # Small organs are drawn first and keep their voxels where a larger neighbour overlaps them.
    for k, organ in reversed(list(enumerate(ORGANS, start=1))):
        scale = rng.uniform(0.82, 1.18)
        center = [c + rng.uniform(-0.06, 0.06) for c in organ.center]
        radii = [r * scale * rng.uniform(0.9, 1.1) for r in organ.radii]
        angle = rng.uniform(-0.35, 0.35)
        cs, sn = np.cos(angle), np.sin(angle)
        # Body-relative, rotated in-plane coordinates.
        u = (coords[1] - body_c[0]) / body_r[0] - center[1]
        v = (coords[2] - body_c[1]) / body_r[1] - center[2]
        u, v = cs * u - sn * v, sn * u + cs * v
        # A 2D case is a slice through every organ, at up to a quarter of its axial radius off its centre.
        w = rng.uniform(-0.25, 0.25) * radii[0] if ndim == 2 else coords[0] - center[0]
        dist = (w / radii[0]) ** 2 + (u / radii[1]) ** 2 + (v / radii[2]) ** 2
        # Irregular outline: smooth displacement of the level set, weaker for thin organs so they stay whole.
        amplitude = 0.25 * min(1.0, min(organ.radii[1:]) / 0.15)
        dist = dist + amplitude * _smooth_noise(rng, shape, max(4, max(shape) // 10))
        inside = (dist < 1.0) & body & (labels == 0)
        labels[inside] = k
        means[k] = organ.intensity + rng.normal(0.0, 0.08)

    # Intensities: per-organ mean with texture; means overlap (liver vs pancreas vs adrenal) and the noise
    # is wider than their gaps, so only shape and context identify the organs.
    texture = 0.12 * _smooth_noise(rng, shape, 3)
    for k, mean in means.items():
        image[labels == k] = mean
    image = np.where(body, image + texture, image)
    bias = 1.0 + 0.15 * _smooth_noise(rng, shape, max(shape) // 2)
    image = image * bias + rng.normal(0.0, 0.12, shape).astype(np.float32)
    return image.astype(np.float32)[..., None], labels


def make_split(seed: int, shape: tuple[int, ...], num_cases: int, *, offset: int = 0):
    """Stacks cases offset..offset+num_cases-1: (images (N, *shape, 1), labels (N, *shape))."""
    cases = [make_case(seed, offset + i, shape) for i in range(num_cases)]
    return np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])


def class_frequencies(seed: int, shape: tuple[int, ...], num_cases: int = 16, *, offset: int = 0) -> np.ndarray:
    """Fraction of voxels of each class over cases offset..offset+num_cases-1, shape (NUM_CLASSES,)."""
    counts = np.zeros(NUM_CLASSES, np.int64)
    for i in range(offset, offset + num_cases):
        counts += np.bincount(make_case(seed, i, shape)[1].ravel(), minlength=NUM_CLASSES)
    return counts / counts.sum()
