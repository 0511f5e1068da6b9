"""Clean phantoms to simulate: transverse carotid, thyroid, tissue layers, point targets, random ellipses.

:func:`simulate_phantom` images one with :func:`~Speckle2SelfLib.simulation.bmode.simulate_bmode`;
:func:`simulated_set` gives quick training and test sets of speckled frames with their clean images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .bmode import SimulationResult, simulate_bmode

PHANTOM_KINDS = ("carotid", "thyroid", "layers", "points", "random")


@dataclass
class PhantomResult:
    """A clean phantom image with regions of interest."""

    clean: np.ndarray  # float32 in [0, 1]
    lumen_mask: Optional[np.ndarray]  # bool, anechoic vessel lumen (carotid, thyroid) else None
    homogeneous_mask: np.ndarray  # bool, a constant-echogenicity region for speckle statistics
    name: str



# ----------------------------------------------------------------------------- phantoms


class _Canvas:
    """Physical coordinates (mm) of the pixel centres of a 45 x 50 mm image, x = 0 in the middle."""

    def __init__(self, size: Tuple[int, int], width_mm: float = 45.0, depth_mm: float = 50.0):
        height, width = size
        z = (np.arange(height) + 0.5) * depth_mm / height
        x = (np.arange(width) + 0.5) * width_mm / width - width_mm / 2.0
        self.z, self.x = np.meshgrid(z, x, indexing="ij")
        self.pixel_mm = (depth_mm / height, width_mm / width)

    def ellipse(self, x0: float, z0: float, ax: float, az: float, angle_deg: float = 0.0) -> np.ndarray:
        a = np.deg2rad(angle_deg)
        dx, dz = self.x - x0, self.z - z0
        u = dx * np.cos(a) + dz * np.sin(a)
        v = -dx * np.sin(a) + dz * np.cos(a)
        return (u / ax) ** 2 + (v / az) ** 2 <= 1.0

    def band(self, z0: float, z1: float, slope: float = 0.0) -> np.ndarray:
        """Rows between depths z0 and z1 (mm), optionally tilted by ``slope`` mm per mm."""
        z = self.z - slope * self.x
        return (z >= z0) & (z < z1)

    def erode(self, mask: np.ndarray, margin_mm: float) -> np.ndarray:
        """Shrink ``mask`` by ``margin_mm`` so speckle statistics stay clear of edges and blur."""
        radius = (max(1, round(margin_mm / self.pixel_mm[0])), max(1, round(margin_mm / self.pixel_mm[1])))
        structure = np.ones((2 * radius[0] + 1, 2 * radius[1] + 1), bool)
        return ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _vessel(canvas: _Canvas, img: np.ndarray, x0: float, z0: float, radius: float,
            wall_mm: float, wall_grey: float, ellipticity: float = 1.0) -> np.ndarray:
    """Draw an anechoic vessel with a bright wall; return the lumen mask."""
    outer = canvas.ellipse(x0, z0, (radius + wall_mm) * ellipticity, radius + wall_mm)
    lumen = canvas.ellipse(x0, z0, radius * ellipticity, radius)
    img[outer] = wall_grey
    img[lumen] = 0.0
    return lumen


def _phantom_carotid(canvas: _Canvas, rng: np.random.Generator, randomise: bool):
    jitter = (lambda lo, hi: rng.uniform(lo, hi)) if randomise else (lambda lo, hi: 0.5 * (lo + hi))
    background = 0.55
    img = np.full(canvas.z.shape, background, np.float32)
    img[canvas.band(0.0, 1.5)] = 0.85                       # skin
    img[canvas.band(1.5, 4.0 + jitter(-0.5, 0.5))] = 0.35   # subcutaneous fat
    muscle = canvas.ellipse(jitter(-4, 4), 7.0, 30.0, 3.5 + jitter(-0.5, 0.5))
    img[muscle] = 0.85                                       # fascia around the muscle
    img[canvas.erode(muscle, 0.4)] = 0.42                    # sternocleidomastoid
    x0, z0 = jitter(-5.0, 5.0), jitter(19.0, 23.0)
    radius = jitter(3.0, 4.0)
    jugular = canvas.ellipse(x0 + jitter(6.5, 8.5), z0 - jitter(3.0, 5.0), jitter(4.0, 6.0), jitter(1.8, 3.0))
    img[jugular] = 0.04
    lumen = _vessel(canvas, img, x0, z0, radius, wall_mm=jitter(0.7, 1.1), wall_grey=0.95,
                    ellipticity=jitter(0.95, 1.1))
    img[canvas.band(34.0 + jitter(-2, 2), 35.5 + jitter(-2, 2), slope=jitter(-0.05, 0.05))] = 0.9
    img[canvas.band(36.0 + jitter(-2, 2), 50.0)] = 0.3                 # deep muscle
    homogeneous = canvas.erode(img == background, 1.5) & canvas.band(10.0, 33.0)
    return img, lumen, homogeneous


def _phantom_thyroid(canvas: _Canvas, rng: np.random.Generator, randomise: bool):
    jitter = (lambda lo, hi: rng.uniform(lo, hi)) if randomise else (lambda lo, hi: 0.5 * (lo + hi))
    img = np.full(canvas.z.shape, 0.45, np.float32)
    img[canvas.band(0.0, 1.5)] = 0.85
    img[canvas.band(1.5, 5.5 + jitter(-0.5, 0.5))] = 0.38    # strap muscles
    gland_grey = 0.7
    gland = canvas.ellipse(jitter(-8, -5), jitter(14, 17), jitter(10, 12), jitter(6, 8), jitter(-10, 10))
    img[gland] = gland_grey
    nodule = canvas.ellipse(jitter(-10, -4), jitter(13, 18), jitter(2, 3.5), jitter(1.5, 3.0))
    img[nodule] = 0.3                                          # hypoechoic nodule
    trachea_x, trachea_z = jitter(11, 15), jitter(11, 14)
    inside = canvas.ellipse(trachea_x, trachea_z, 6.0, 6.0)
    arc = canvas.ellipse(trachea_x, trachea_z, 7.0, 7.0) & ~inside & (canvas.z < trachea_z)
    # Air reflects everything: a bright arc with shadow and reverberation beneath it.
    shadow = inside | ((np.abs(canvas.x - trachea_x) < 7.0) & (canvas.z >= trachea_z))
    img[arc] = 1.0
    img[shadow] = 0.12
    lumen = _vessel(canvas, img, jitter(-20, -18), jitter(15, 19), jitter(2.8, 3.5), 0.8, 0.95)
    img[canvas.band(38.0 + jitter(-2, 2), 50.0) & ~shadow] = 0.3
    homogeneous = canvas.erode((img == gland_grey) & gland, 1.5)
    return img, lumen, homogeneous


def _phantom_layers(canvas: _Canvas, rng: np.random.Generator, randomise: bool):
    depths = np.array([0.0, 6.0, 14.0, 20.0, 30.0, 38.0, 50.0])
    greys = np.array([0.8, 0.4, 0.65, 0.25, 0.55, 0.9])
    if randomise:
        depths[1:-1] += rng.uniform(-1.5, 1.5, depths.size - 2)
        greys = rng.uniform(0.1, 0.95, greys.size)
    img = np.empty(canvas.z.shape, np.float32)
    for z0, z1, grey in zip(depths[:-1], depths[1:], greys):
        img[canvas.band(z0, z1)] = grey
    thickest = int(np.argmax(np.diff(depths)))
    homogeneous = canvas.erode(canvas.band(depths[thickest], depths[thickest + 1]), 1.5)
    return img, None, homogeneous


def _phantom_points(canvas: _Canvas, rng: np.random.Generator, randomise: bool):
    background = 0.5
    img = np.full(canvas.z.shape, background, np.float32)
    shift = rng.uniform(-1.0, 1.0, 2) if randomise else np.zeros(2)
    for depth in np.arange(5.0, 50.0, 5.0):                     # axial column of point targets
        img[canvas.ellipse(-15.0 + shift[0], depth + shift[1], 0.25, 0.25)] = 1.0
    for lateral in np.arange(-8.0, 20.0, 4.0):                  # lateral row of point targets
        img[canvas.ellipse(lateral + shift[0], 8.0 + shift[1], 0.25, 0.25)] = 1.0
    for i, diameter in enumerate((2.0, 4.0, 6.0)):              # anechoic cysts
        img[canvas.ellipse(-4.0 + 8.0 * i + shift[0], 20.0 + shift[1], diameter / 2, diameter / 2)] = 0.0
    for i, diameter in enumerate((3.0, 5.0)):                   # hyperechoic inclusions
        img[canvas.ellipse(0.0 + 10.0 * i + shift[0], 32.0 + shift[1], diameter / 2, diameter / 2)] = 0.85
    homogeneous = canvas.erode(img == background, 1.5) & canvas.band(38.0, 48.0) & (canvas.x > -10.0)
    return img, None, homogeneous


def _phantom_random(canvas: _Canvas, rng: np.random.Generator, randomise: bool):
    background = float(rng.uniform(0.3, 0.7))
    img = np.full(canvas.z.shape, background, np.float32)
    for _ in range(int(rng.integers(5, 13))):
        grey = float(rng.uniform(0.0, 1.0))
        shape = canvas.ellipse(rng.uniform(-20, 20), rng.uniform(3, 47), rng.uniform(1, 8),
                               rng.uniform(1, 6), rng.uniform(0, 180))
        img[shape] = grey
    homogeneous = canvas.erode(img == background, 1.5)
    return img, None, homogeneous


_PHANTOMS = {"carotid": _phantom_carotid, "thyroid": _phantom_thyroid, "layers": _phantom_layers,
             "points": _phantom_points, "random": _phantom_random}


def make_phantom(kind: str, size: Sequence[int] = (512, 512), seed: Optional[int] = None) -> PhantomResult:
    """A clean phantom of a 45 mm (lateral) x 50 mm (axial) field of view.

    kind: "carotid" (transverse carotid: anechoic lumen, bright wall, jugular vein, layers),
    "thyroid" (gland with a nodule, trachea with shadow, carotid), "layers" (horizontal tissue
    layers with step edges), "points" (point targets, cysts, inclusions), "random" (ellipses).
    seed: None gives the canonical layout; an integer randomises positions, sizes and grey levels.
    """
    if kind not in _PHANTOMS:
        raise ValueError(f"unknown phantom {kind!r}; choose one of {PHANTOM_KINDS}")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be (height, width) with both >= 16, got {size}")
    canvas = _Canvas(size)
    rng = np.random.default_rng(0 if seed is None else seed)
    img, lumen, homogeneous = _PHANTOMS[kind](canvas, rng, seed is not None)
    if not homogeneous.any():
        raise ValueError(f"size {size} is too small to keep a homogeneous region in the {kind} phantom")
    return PhantomResult(clean=np.clip(img, 0.0, 1.0).astype(np.float32),
                         lumen_mask=None if lumen is None else lumen.astype(bool),
                         homogeneous_mask=homogeneous.astype(bool), name=kind)


def simulate_phantom(kind: str, fc: float = 7.5e6, seed: Optional[int] = 0,
                     size: Sequence[int] = (512, 512)) -> Tuple[PhantomResult, SimulationResult]:
    """Phantom ``kind`` and its simulated B-mode image; ``seed`` sets both the layout and the
    speckle (None: canonical layout, fresh speckle)."""
    phantom = make_phantom(kind, size=size, seed=seed)
    return phantom, simulate_bmode(phantom.clean, fc=fc, seed=seed)


def simulated_set(n: int, size: int = 128, seed: int = 0,
                  kinds: Sequence[str] = ("carotid", "thyroid", "layers", "random")):
    """``n`` speckled frames (float32 [0, 1]) and their clean phantoms, cycling through ``kinds``
    with seeds ``seed``, ``seed + 1``, ...: training and test sets for quick experiments."""
    noisy, clean = [], []
    for i in range(n):
        phantom, sim = simulate_phantom(kinds[i % len(kinds)], seed=seed + i, size=(size, size))
        noisy.append(sim.bmode.astype(np.float32))
        clean.append(phantom.clean.astype(np.float32))
    return noisy, clean
