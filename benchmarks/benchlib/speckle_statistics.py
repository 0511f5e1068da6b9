"""Statistics of simulated speckle and the exact MUST reference they are checked against.

Benchmark code (benchmarks/simulated.py and the simulator's tests; not installed with the
package): envelope SNR, the envelope autocorrelation and its FWHM (the speckle grain in mm),
and :func:`simulate_patch_must`, a homogeneous patch simulated with MUST (the optional
``pymust`` package, ``pip install "speckle2self[exact-simulation]"``; slow).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

from Speckle2SelfLib.metrics import speckle_snr
from Speckle2SelfLib.simulation.bmode import PLANE_WAVE_TILTS_DEG, half_width

Region = Union[np.ndarray, Tuple[int, int, int, int], Tuple[slice, slice]]


def envelope_snr(envelope: np.ndarray, mask: np.ndarray) -> float:
    """Envelope SNR mean / std inside ``mask``: 1.91 for fully developed (Rayleigh) speckle."""
    return speckle_snr(envelope, np.asarray(mask, dtype=bool))


def _region_mask(shape: Tuple[int, int], region: Region) -> np.ndarray:
    if isinstance(region, np.ndarray) and region.dtype == bool:
        if region.shape != shape:
            raise ValueError(f"mask shape {region.shape} does not match image shape {shape}")
        return region
    mask = np.zeros(shape, bool)
    if len(region) == 2 and all(isinstance(s, slice) for s in region):
        mask[region] = True
    elif len(region) == 4:
        r0, r1, c0, c1 = (int(v) for v in region)
        mask[r0:r1, c0:c1] = True
    else:
        raise ValueError("region must be a bool mask, (row0, row1, col0, col1) or (slice, slice)")
    return mask


def autocorrelation(envelope: np.ndarray, region: Region) -> np.ndarray:
    """Normalised autocovariance of ``envelope`` over ``region`` (a mask of any shape), indexed
    by non-negative lags [axial, lateral] (index [0, 0] = lag 0, value 1).

    Each lag averages the products of all pixel pairs that both lie in the region.
    """
    env = np.asarray(envelope, dtype=np.float64)
    if env.ndim != 2:
        raise ValueError(f"envelope must be 2D, got shape {env.shape}")
    mask = _region_mask(env.shape, region)
    rows, cols = np.nonzero(mask)
    if rows.size < 16:
        raise ValueError("region has fewer than 16 pixels; choose a larger region")
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    m = mask[box].astype(np.float64)
    e = np.where(m > 0, env[box] - env[box][m > 0].mean(), 0.0)
    shape = (2 * m.shape[0], 2 * m.shape[1])
    num = np.fft.irfft2(np.abs(np.fft.rfft2(e, shape)) ** 2, shape)
    pairs = np.fft.irfft2(np.abs(np.fft.rfft2(m, shape)) ** 2, shape)
    acf = num[: m.shape[0], : m.shape[1]] / np.maximum(pairs[: m.shape[0], : m.shape[1]], 0.5)
    return acf / acf[0, 0]


def autocorrelation_fwhm_mm(envelope: np.ndarray, region: Region,
                            pixel_mm: Tuple[float, float]) -> Tuple[float, float]:
    """Speckle grain size: FWHM (axial, lateral) in mm of the envelope autocovariance in ``region``.

    region: bool mask, (row0, row1, col0, col1) or (slice, slice); pixel_mm: (axial, lateral).
    """
    acf = autocorrelation(envelope, region)
    return (2.0 * half_width(acf[:, 0]) * pixel_mm[0], 2.0 * half_width(acf[0, :]) * pixel_mm[1])



def simulate_patch_must(fc: float = 7.5e6, width_mm: float = 5.0, depth_range_mm=(18.0, 21.0),
                        seed: int = 0, scatterers_per_mm2: float = 200.0,
                        tilts_deg: Sequence[float] = PLANE_WAVE_TILTS_DEG,
                        pixel_mm: Tuple[float, float] = (0.02, 0.04), n_elements: int = 192):
    """Homogeneous speckle patch simulated with MUST (optional ``pymust`` package; slow).

    L12-3V probe (``n_elements`` central elements), plane waves at ``tilts_deg`` coherently
    compounded, DAS onto a grid of ``pixel_mm`` covering the inner part of the scatterer patch
    (1 mm margin). Returns (envelope (H, W), pixel_mm). Cost: ~2 ms per scatterer and tilt with
    192 elements on one core.
    """
    try:
        import pymust
    except ImportError as exc:  # pragma: no cover - depends on the optional package
        raise ImportError("simulate_patch_must needs the optional package pymust: pip install pymust") from exc
    rng = np.random.default_rng(seed)
    param = pymust.getparam("L12-3V")
    param.fc = fc
    param.fs = 4.0 * fc
    param.Nelements = int(n_elements)
    z0, z1 = (d * 1e-3 for d in depth_range_mm)
    half_width = width_mm * 1e-3 / 2.0
    count = int(scatterers_per_mm2 * width_mm * (depth_range_mm[1] - depth_range_mm[0]))
    xs = rng.uniform(-half_width, half_width, count)
    zs = rng.uniform(z0, z1, count)
    rc = rng.standard_normal(count)
    dz, dx = pixel_mm[0] * 1e-3, pixel_mm[1] * 1e-3
    margin = 1e-3
    xg, zg = np.meshgrid(np.arange(-half_width + margin, half_width - margin, dx),
                         np.arange(z0 + margin, z1 - margin, dz))
    compound = np.zeros(xg.shape, np.complex128)
    for tilt in np.deg2rad(np.asarray(tilts_deg, dtype=float)):
        delays = pymust.txdelay(param, float(tilt))
        rf, _ = pymust.simus(xs, zs, rc, delays, param)
        iq = pymust.rf2iq(rf, param)
        param.fnumber = None  # let dasmtx choose the receive f-number
        das = pymust.dasmtx(1j * np.array(iq.shape), xg, zg, delays, param)
        compound += (das @ iq.reshape(-1, order="F")).reshape(xg.shape, order="F")
    return np.abs(compound).astype(np.float32), tuple(pixel_mm)
