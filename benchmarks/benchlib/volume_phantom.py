"""Simulated 3D ultrasound volumes with a clean truth, for the slice-axis benchmark and tests.

A 3D echogenicity phantom (skin and fat layers, a vessel running obliquely through the sweep, a
bright and a dark inclusion) is imaged frame by frame with the built-in B-mode simulator
(:func:`Speckle2SelfLib.simulation.simulate_bmode`), each frame with its own scatterers, as a
freehand sweep or a 3D probe sees it: speckle decorrelated between frames. The stack is
(frames, depth, lateral) = (K, J, I), the truth is the simulator's speckle-free reference.
Pixels are 0.098 mm (depth) x 0.088 mm (lateral), the grain of the 512 x 512 / 45 x 50 mm images
the bundled models were tested on.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

PIXEL_MM = (50.0 / 512, 45.0 / 512)     # depth, lateral


def phantom_3d(frames: int = 48, depth: int = 128, lateral: int = 128, seed: int = 0,
               frame_mm: float = 0.25) -> np.ndarray:
    """Clean echogenicity (frames, depth, lateral) in [0, 1]."""
    rng = np.random.default_rng(seed)
    z = (np.arange(depth) + 0.5) * PIXEL_MM[0]
    x = (np.arange(lateral) + 0.5) * PIXEL_MM[1]
    y = (np.arange(frames) + 0.5) * frame_mm
    Y, Z, X = np.meshgrid(y, z, x, indexing="ij")
    h_mm, w_mm, e_mm = depth * PIXEL_MM[0], lateral * PIXEL_MM[1], frames * frame_mm
    clean = np.full(Y.shape, 0.55, np.float32)
    skin = 0.08 * h_mm + 0.02 * h_mm * np.sin(2 * np.pi * X / w_mm + rng.uniform(0, 6))
    clean[Z < skin] = 0.9
    fat = skin + 0.15 * h_mm
    clean[(Z >= skin) & (Z < fat)] = 0.35
    clean[(Z >= fat) & (Z < fat + 0.03 * h_mm)] = 0.8                 # fascia
    # vessel along the sweep, drifting laterally and in depth from frame to frame
    cz = 0.62 * h_mm + 0.08 * h_mm * (Y / e_mm - 0.5)
    cx = 0.45 * w_mm + 0.25 * w_mm * (Y / e_mm - 0.5)
    r = np.hypot(Z - cz, X - cx)
    radius = 0.16 * min(h_mm, w_mm)
    clean[(r >= radius) & (r < radius * 1.18)] = 0.95                 # wall
    clean[r < radius] = 0.02                                          # lumen
    for centre, radius_frac, level in (((0.45, 0.78, 0.8), 0.12, 0.85), ((0.6, 0.3, 0.35), 0.09, 0.2)):
        c = np.array(centre) * np.array([e_mm, h_mm, w_mm])
        d = np.sqrt(((Y - c[0]) / 1.5) ** 2 + (Z - c[1]) ** 2 + (X - c[2]) ** 2)
        clean[d < radius_frac * min(h_mm, w_mm)] = level
    return np.clip(clean, 0, 1).astype(np.float32)


def simulate_volume(frames: int = 48, depth: int = 128, lateral: int = 128, seed: int = 0,
                    attenuation_db_cm_mhz: float = 0.3) -> Tuple[np.ndarray, np.ndarray]:
    """(noisy, truth), both float32 (frames, depth, lateral) = (K, J, I) in [0, 1]: each frame
    simulated with its own speckle; attenuation left partly uncompensated, as on a scanner
    whose gain is set by eye."""
    from Speckle2SelfLib.simulation import simulate_bmode

    clean = phantom_3d(frames, depth, lateral, seed)
    noisy = np.empty_like(clean)
    truth = np.empty_like(clean)
    for k in range(frames):
        sim = simulate_bmode(clean[k], seed=seed * 1000 + k, depth_mm=depth * PIXEL_MM[0],
                             width_mm=lateral * PIXEL_MM[1], attenuation_db_cm_mhz=attenuation_db_cm_mhz,
                             tgc=False)
        noisy[k], truth[k] = sim.bmode, sim.reference
    return noisy, truth


def to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 grey levels (what a scanner exports)."""
    return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
