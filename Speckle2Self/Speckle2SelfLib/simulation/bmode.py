"""Fast ultrasound B-mode speckle simulator with a clean ground truth.

The Speckle2Self paper simulated its test images with MUST (linear probe L12-3V, pitch 0.2 mm,
fc = 7.5 MHz and 3.75 / 5.63 / 9.38 MHz, 9 plane waves tilted -2..+2 deg and coherently
compounded, scatterers modulated by a clean image, delay-and-sum, envelope, log compression,
512 x 512 pixels for 45 mm lateral x 50 mm axial). A full MUST simulation of such an image takes
hours, so this module uses the equivalent linear-systems (k-space / convolution) model:

1. Echogenicity from the clean grey level g in [0, 1] over ``echo_range_db``:
   ``E = 10 ** (-echo_range_db * (1 - g) / 10)`` (g = 1 -> 0 dB, g = 0 -> -40 dB).
2. Scatterers: a complex white Gaussian field of amplitude ``sqrt(E)`` on a fine physical grid.
   A Gaussian field is the limit of many random scatterers per resolution cell, i.e. fully
   developed speckle (Rayleigh envelope, mean/std = 1.91).
3. Beamformed IQ = scatterer field convolved with the pulse-echo PSF (baseband): a Gaussian
   pulse envelope axially times a Gaussian receive beam laterally, coherently summed over the
   9 plane-wave tilts (each tilt shifts the lateral spectrum by k0 sin(theta)). Coherent
   compounding of Gaussian fields stays Gaussian, so the Rayleigh statistics are kept. The PSF
   widths are solved so that the envelope autocorrelation FWHM is 0.14 mm axial and 0.33 mm
   lateral at 7.5 MHz (what MUST gives for this set-up, see below). At other frequencies the
   axial grain scales with the wavelength; the lateral grain scales with wavelength x receive
   f-number, and MUST picks that f-number from the element directivity, so it hardly changes
   (see :func:`grain_fwhm_mm`; ``lateral_scaling="wavelength"`` gives plain c / fc scaling).
4. Optional depth attenuation, electronic noise and time-gain compensation (TGC).
5. The IQ field is point-sampled at the output pixel centres (as DAS beamforming onto the image
   grid does), envelope = |IQ|, log compression over ``dynamic_range_db`` to [0, 1].
   The scatterers and PSF live on a grid refined by an integer factor per axis (at least one
   sample per PSF standard deviation), so a 512 x 512 image takes well under a second.

Checks against MUST (pymust 0.1.9, L12-3V with all 192 elements, plane waves over -2..2 deg
coherently compounded, DAS with MUST's automatic receive f-number, homogeneous patches 16-24 mm
deep; 9 tilts at 3.75 and 7.5 MHz, 3 tilts at 5.63 and 9.38 MHz to save time):

========  =====================  ==========================  =============
fc (MHz)  MUST FWHM ax/lat (mm)  this model, default (mm)    MUST mean/std
========  =====================  ==========================  =============
3.75      0.29 / 0.39            0.28 / 0.37                 1.75
5.63      0.20 / 0.35            0.19 / 0.34                 1.77
7.50      0.136 / 0.32           0.14 / 0.33                 1.85
9.38      0.117 / 0.34           0.112 / 0.33                1.78
========  =====================  ==========================  =============

The MUST patches are small (a few hundred grains), so their figures carry several percent of
noise; their mean/std below 1.91 probably reflects the finite scatterer density (about 5-10
per resolution cell). ``simulate_patch_must`` (benchmarks/benchlib/speckle_statistics.py)
reruns such a patch when the optional ``pymust`` package is installed; this model's own
figures come from ``benchmarks/simulated.py --speckle-stats`` (mean/std 1.91-1.92 at all four
frequencies). Phantoms (clean images to simulate) are :mod:`.phantoms`.

Besides the clean image, :class:`SimulationResult` carries ``reference``: the expected B-mode
without speckle (PSF-blurred echogenicity, log-compressed with the same display mapping and the
Rayleigh log bias). It is what an ideal despeckler can reach, so benchmarks score against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
from scipy import optimize, signal, special

SOUND_SPEED_M_S = 1540.0
REFERENCE_FC_HZ = 7.5e6
# Envelope autocorrelation FWHM (axial, lateral) in mm at REFERENCE_FC_HZ; scales with c / fc.
REFERENCE_GRAIN_FWHM_MM = (0.14, 0.33)
PAPER_FREQUENCIES_HZ = (3.75e6, 5.63e6, 7.5e6, 9.38e6)
PLANE_WAVE_TILTS_DEG = tuple(np.linspace(-2.0, 2.0, 9))
LATERAL_SCALINGS = ("must", "wavelength")
# L12-3V (Verasonics) element width and pulse-echo 6 dB fractional bandwidth, as in MUST's getparam.
L12_3V_ELEMENT_WIDTH_M = 0.17e-3
L12_3V_BANDWIDTH_PERCENT = 93.0
# Top of the displayed range relative to the mean intensity of echogenicity 0 dB (g = 1).
# MUST's bmode() normalises by the image maximum; for ~5e5 Rayleigh samples that maximum lies
# about 11 dB above the mean, so a fixed +11 dB gives the same look without depending on the draw.
DISPLAY_TOP_DB = 11.0
# E[10 log10(I / <I>)] for exponential intensity (Rayleigh envelope) = -10 log10(e) * Euler gamma.
RAYLEIGH_LOG_BIAS_DB = -10.0 * math.log10(math.e) * float(np.euler_gamma)
# Fine-grid samples per PSF standard deviation: >= 1 keeps the discrete convolution a faithful
# sampling of the continuous one (aliasing error ~exp(-2 pi^2 s^2)).
SAMPLES_PER_SIGMA = 1.0
PSF_HALF_WIDTH_SIGMAS = 4.0



@dataclass
class SimulationResult:
    """A simulated B-mode image and its ground truth, all (H, W) on the output grid."""

    bmode: np.ndarray  # float32 in [0, 1], log-compressed display image
    envelope: np.ndarray  # float32, linear pre-log envelope |IQ| after TGC
    clean: np.ndarray  # float32 in [0, 1], the input clean image (echogenicity map)
    reference: np.ndarray  # float32 in [0, 1], expected B-mode without speckle (same mapping)
    pixel_mm: Tuple[float, float]  # (axial, lateral) pixel size in mm
    fc: float  # centre frequency in Hz
    grain_fwhm_mm: Tuple[float, float]  # designed envelope autocorrelation FWHM (axial, lateral)



# ----------------------------------------------------------------------------- PSF design


def must_receive_fnumber(fc: float) -> float:
    """Receive f-number that MUST's DAS (``dasmtx`` with ``fnumber = []``) picks for the L12-3V.

    MUST limits the receive aperture to the angle alpha where the element directivity
    cos(a) sinc(w sin(a) / lambda_min) falls to 0.71 (w = element width, lambda_min = wavelength
    at the top of the 6 dB band); f-number = 1 / (2 tan(alpha)). Wider elements relative to the
    wavelength are more directive, so the f-number grows with frequency.
    """
    lambda_min = SOUND_SPEED_M_S / (fc * (1.0 + L12_3V_BANDWIDTH_PERCENT / 200.0))
    ratio = L12_3V_ELEMENT_WIDTH_M / lambda_min

    def directivity_gap(angle: float) -> float:
        return math.cos(angle) * np.sinc(ratio * math.sin(angle)) - 0.71

    alpha = optimize.brentq(directivity_gap, 1e-6, math.pi / 2 - 1e-6)
    return 1.0 / (2.0 * math.tan(alpha))


def grain_fwhm_mm(fc: float, lateral_scaling: str = "must") -> Tuple[float, float]:
    """Target envelope autocorrelation FWHM (axial, lateral) in mm at ``fc``.

    Axial grain scales with the wavelength c / fc (fixed fractional bandwidth). Lateral grain
    scales with wavelength x receive f-number: ``"must"`` uses MUST's f-number rule
    (:func:`must_receive_fnumber`), which keeps the lateral grain nearly constant (0.37 mm at
    3.75 MHz, 0.33 mm at 9.38 MHz); ``"wavelength"`` assumes a fixed f-number (lateral grain
    proportional to c / fc).
    """
    if lateral_scaling not in LATERAL_SCALINGS:
        raise ValueError(f"lateral_scaling must be one of {LATERAL_SCALINGS}, got {lateral_scaling!r}")
    if not fc > 0:
        raise ValueError(f"fc must be a positive frequency in Hz, got {fc}")
    scale = REFERENCE_FC_HZ / fc
    lateral_scale = scale
    if lateral_scaling == "must":
        lateral_scale *= must_receive_fnumber(fc) / must_receive_fnumber(REFERENCE_FC_HZ)
    return REFERENCE_GRAIN_FWHM_MM[0] * scale, REFERENCE_GRAIN_FWHM_MM[1] * lateral_scale


def _envelope_correlation(field_corr_sq: np.ndarray) -> np.ndarray:
    """Normalised envelope autocovariance of a complex Gaussian field from |field corr|^2.

    For a Rayleigh envelope: rho_A = pi / (4 - pi) * (2F1(-1/2, -1/2; 1; |rho|^2) - 1), which is
    1 at |rho| = 1 and ~0.915 |rho|^2 for small |rho|.
    """
    x = np.clip(field_corr_sq, 0.0, 1.0)
    return math.pi / (4.0 - math.pi) * (special.hyp2f1(-0.5, -0.5, 1.0, x) - 1.0)


@lru_cache(maxsize=None)
def _half_max_field_corr_sq() -> float:
    """|field correlation|^2 at which the envelope autocovariance falls to one half."""
    return optimize.brentq(lambda x: _envelope_correlation(np.array(x)) - 0.5, 1e-6, 1.0)


def _lateral_profile(x_over_lambda: np.ndarray, sigma_over_lambda: float) -> np.ndarray:
    """Baseband lateral PSF: Gaussian receive beam times the coherent sum of the plane-wave tilts.

    Tilt theta multiplies the PSF by exp(i k0 x sin(theta)); the tilts are symmetric, so the
    sum is the real mean of cos(k0 x sin(theta)).
    """
    k0x = 2.0 * np.pi * x_over_lambda
    tilts = np.deg2rad(np.asarray(PLANE_WAVE_TILTS_DEG))
    compounding = np.cos(np.multiply.outer(k0x, np.sin(tilts))).mean(axis=-1)
    return np.exp(-0.5 * (x_over_lambda / sigma_over_lambda) ** 2) * compounding


def _fwhm_of_profile(profile: np.ndarray, step: float) -> float:
    """FWHM of a symmetric 1D PSF profile sampled from its centre outwards (index 0 = centre)."""
    full = np.concatenate([profile[:0:-1], profile])
    corr = np.correlate(full, full, mode="full")[full.size - 1:]
    rho_env = _envelope_correlation((corr / corr[0]) ** 2)
    return 2.0 * half_width(rho_env) * step


@lru_cache(maxsize=64)
def _psf_sigmas_over_lambda(fc: float, lateral_scaling: str) -> Tuple[float, float]:
    """PSF standard deviations (axial, lateral) in wavelengths that give :func:`grain_fwhm_mm`."""
    wavelength_mm = SOUND_SPEED_M_S / fc * 1e3
    target_axial, target_lateral = (w / wavelength_mm for w in grain_fwhm_mm(fc, lateral_scaling))
    # Axial: |field corr|^2 of a Gaussian pulse of std s is exp(-t^2 / (2 s^2)): solve directly.
    x_half = _half_max_field_corr_sq()
    sigma_axial = target_axial / (2.0 * math.sqrt(-2.0 * math.log(x_half)))
    # Lateral: the compounding term makes it non-Gaussian, so solve numerically.
    step = 0.01
    x = np.arange(0.0, 12.0, step)

    def lateral_error(sigma: float) -> float:
        return _fwhm_of_profile(_lateral_profile(x, sigma), step) - target_lateral

    sigma_lateral = optimize.brentq(lateral_error, 0.1 * target_lateral, 2.0 * target_lateral)
    return sigma_axial, float(sigma_lateral)


def _psf_kernels(fc: float, step_mm: Tuple[float, float], lateral_scaling: str) -> Tuple[np.ndarray, np.ndarray]:
    """Separable real baseband PSF (axial kernel, lateral kernel) on a grid of ``step_mm``."""
    wavelength_mm = SOUND_SPEED_M_S / fc * 1e3
    sig_ax, sig_lat = (s * wavelength_mm for s in _psf_sigmas_over_lambda(float(fc), lateral_scaling))
    kernels = []
    for sigma, step, lateral in ((sig_ax, step_mm[0], False), (sig_lat, step_mm[1], True)):
        half = int(math.ceil(PSF_HALF_WIDTH_SIGMAS * sigma / step))
        pos = np.arange(-half, half + 1) * step
        if lateral:
            kernel = _lateral_profile(pos / wavelength_mm, sig_lat / wavelength_mm)
        else:
            kernel = np.exp(-0.5 * (pos / sigma) ** 2)
        # Unit energy: a unit-echogenicity region then has mean intensity 1.
        kernels.append((kernel / np.sqrt(np.sum(kernel ** 2))).astype(np.float32))
    return kernels[0], kernels[1]


# ----------------------------------------------------------------------------- simulation


def _check_clean(clean: np.ndarray) -> np.ndarray:
    arr = np.asarray(clean)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"clean must be a 2D (H, W) image with H, W >= 2, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"clean must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("clean contains NaN or infinite values; replace them before simulating")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(
            f"clean must be scaled to [0, 1], got range [{arr.min():.3g}, {arr.max():.3g}]; "
            "divide 8-bit images by 255")
    return arr


def _upsample_linear(img: np.ndarray, factors: Tuple[int, int], pad: Tuple[int, int]) -> np.ndarray:
    """Linear interpolation onto a grid ``factors`` times finer whose every factor-th sample is an
    output pixel centre, extended by ``pad`` fine samples per side (edge values outside)."""
    out = img
    for axis, (n, m, p) in enumerate(zip(img.shape, factors, pad)):
        pos = np.clip((np.arange(n * m + 2 * p) - p) / m, 0.0, n - 1)
        lower = np.minimum(pos.astype(np.intp), n - 2)
        weight = (pos - lower).astype(np.float32)
        shape = [1, 1]
        shape[axis] = -1
        weight = weight.reshape(shape)
        out = (np.take(out, lower, axis=axis) * (1.0 - weight)
               + np.take(out, lower + 1, axis=axis) * weight)
    return out.astype(np.float32)


def _convolve_separable(field: np.ndarray, k_axial: np.ndarray, k_lateral: np.ndarray) -> np.ndarray:
    """'valid' convolution with the separable kernel k_axial[:, None] * k_lateral[None, :]."""
    out = signal.fftconvolve(field, k_axial[:, None], mode="valid", axes=0)
    return signal.fftconvolve(out, k_lateral[None, :], mode="valid", axes=1)


def _depth_attenuation(depth_mm: np.ndarray, fc: float, db_per_cm_mhz: float) -> np.ndarray:
    """Two-way amplitude attenuation factor at each depth."""
    loss_db = 2.0 * db_per_cm_mhz * (fc / 1e6) * (depth_mm / 10.0)
    return (10.0 ** (-loss_db / 20.0)).astype(np.float32)


def log_compress(envelope: np.ndarray, dynamic_range_db: float = 60.0,
                 top_db: float = DISPLAY_TOP_DB) -> np.ndarray:
    """Envelope -> display [0, 1]: 20 log10(env) mapped from [top - DR, top] dB to [0, 1]."""
    env_db = 20.0 * np.log10(np.maximum(envelope, 1e-12))
    return np.clip((env_db - top_db + dynamic_range_db) / dynamic_range_db, 0.0, 1.0).astype(np.float32)


#: Centre frequencies the simulator takes (Hz): clinical to high-frequency probes. Below, the
#: PSF kernels grow with the wavelength until they no longer fit in memory (7.5 Hz, a frequency
#: given in MHz by mistake, would need terabytes).
FC_LIMITS_HZ = (0.5e6, 100e6)


def check_fc(fc: float) -> float:
    """``fc`` as a float if it lies in :data:`FC_LIMITS_HZ`, else a ValueError naming the unit."""
    low, high = FC_LIMITS_HZ
    try:
        value = float(fc)
    except (TypeError, ValueError):
        raise ValueError(f"fc must be a centre frequency in Hz, got {fc!r}") from None
    if not low <= value <= high:
        hint = f" (in MHz? {value:g} MHz is {value:g}e6 Hz)" if 0 < value < 1000 else ""
        raise ValueError(f"fc must be a centre frequency in Hz from {low:g} to {high:g}, e.g. 7.5e6 for "
                         f"7.5 MHz; got {value:g}{hint}")
    return value


def simulate_bmode(clean: np.ndarray, fc: float = 7.5e6, seed: Optional[int] = None,
                   width_mm: float = 45.0, depth_mm: float = 50.0,
                   dynamic_range_db: float = 60.0, echo_range_db: float = 40.0,
                   attenuation_db_cm_mhz: float = 0.0, noise_db: Optional[float] = None,
                   tgc: bool = True, lateral_scaling: str = "must") -> SimulationResult:
    """Simulate a B-mode image of the echogenicity map ``clean`` (H, W) in [0, 1].

    Parameters
    ----------
    clean: clean image, rows = depth (0 at the probe), columns = lateral; not modified.
    fc: centre frequency in Hz (:data:`FC_LIMITS_HZ`); the speckle grain scales with the wavelength c / fc.
    seed: random seed of the scatterer field (None: fresh entropy).
    width_mm, depth_mm: physical extent of the image (the paper: 45 x 50 mm).
    dynamic_range_db: displayed dynamic range of the log compression.
    echo_range_db: echogenicity range spanned by clean grey levels 0..1.
    attenuation_db_cm_mhz: tissue attenuation (0 = none; soft tissue ~0.5).
    noise_db: electronic noise power relative to echogenicity 0 dB (None = no noise), added
        before TGC so that it grows with depth like on a scanner.
    tgc: compensate the nominal attenuation (time-gain compensation).
    lateral_scaling: how the lateral grain follows fc, see :func:`grain_fwhm_mm`.
    """
    clean = _check_clean(clean)
    fc = check_fc(fc)
    if not width_mm > 0 or not depth_mm > 0:
        raise ValueError(f"width_mm and depth_mm must be positive, got {width_mm}, {depth_mm}")
    if not dynamic_range_db > 0 or not echo_range_db >= 0:
        raise ValueError("dynamic_range_db must be > 0 and echo_range_db >= 0")
    height, width = clean.shape
    pixel_mm = (depth_mm / height, width_mm / width)
    grain = grain_fwhm_mm(fc, lateral_scaling)
    factors, fine_step = _fine_grid(pixel_mm, fc, lateral_scaling)
    k_axial, k_lateral = _psf_kernels(fc, fine_step, lateral_scaling)
    pad = (k_axial.size // 2, k_lateral.size // 2)

    # Echogenicity (power) on the padded fine grid; padding repeats the edge so the border is
    # not darkened by missing scatterers.
    grey = _upsample_linear(clean, factors, pad)
    echo_power = 10.0 ** (-echo_range_db * (1.0 - grey) / 10.0)
    depth_fine = (np.arange(grey.shape[0]) - pad[0]) * fine_step[0] + 0.5 * pixel_mm[0]
    attenuation = _depth_attenuation(np.clip(depth_fine, 0.0, None), fc, attenuation_db_cm_mhz)[:, None]
    noise_power = 0.0 if noise_db is None else 10.0 ** (noise_db / 10.0)
    # Echo and (independent, equally band-limited) noise add in power before the PSF.
    scatter_power = echo_power * attenuation ** 2 + noise_power

    rng = np.random.default_rng(seed)
    white = rng.standard_normal((2,) + grey.shape, dtype=np.float32)
    field = (white[0] + 1j * white[1]).astype(np.complex64) * np.sqrt(scatter_power / 2.0)
    # Point-sample at the output pixel centres, as DAS beamforming onto the image grid does.
    iq = _convolve_separable(field, k_axial, k_lateral)[::factors[0], ::factors[1]]
    mean_intensity = _convolve_separable(scatter_power, k_axial ** 2, k_lateral ** 2)[::factors[0], ::factors[1]]

    gain = 1.0 / attenuation[pad[0]::factors[0]][:height] if tgc else np.ones((height, 1), np.float32)
    envelope = (np.abs(iq) * gain).astype(np.float32)
    return SimulationResult(
        bmode=log_compress(envelope, dynamic_range_db), envelope=envelope, clean=clean,
        reference=_expected_bmode(mean_intensity * gain ** 2, dynamic_range_db), pixel_mm=pixel_mm,
        fc=float(fc), grain_fwhm_mm=grain)


def _fine_grid(pixel_mm: Tuple[float, float], fc: float,
               lateral_scaling: str) -> Tuple[Tuple[int, int], Tuple[float, float]]:
    """Integer refinement per axis (so output pixels are exact fine-grid samples) giving at least
    SAMPLES_PER_SIGMA samples per PSF standard deviation; returns (factors, fine step in mm)."""
    wavelength_mm = SOUND_SPEED_M_S / fc * 1e3
    sigmas_mm = [s * wavelength_mm for s in _psf_sigmas_over_lambda(float(fc), lateral_scaling)]
    factors = tuple(max(1, math.ceil(p * SAMPLES_PER_SIGMA / s)) for p, s in zip(pixel_mm, sigmas_mm))
    return factors, (pixel_mm[0] / factors[0], pixel_mm[1] / factors[1])


def _expected_bmode(mean_intensity: np.ndarray, dynamic_range_db: float) -> np.ndarray:
    """Display value of the mean log-compressed speckle: E[10 log10 I] = 10 log10 <I> + bias."""
    expected_db = 10.0 * np.log10(np.maximum(mean_intensity, 1e-24)) + RAYLEIGH_LOG_BIAS_DB
    display = (expected_db - DISPLAY_TOP_DB + dynamic_range_db) / dynamic_range_db
    return np.clip(display, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- statistics


def _region_values(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != img.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {img.shape}")
    values = img[mask]
    if values.size < 2:
        raise ValueError("mask selects fewer than 2 pixels; choose a larger region")
    return values


def speckle_contrast(img: np.ndarray, mask: np.ndarray) -> float:
    """Speckle contrast std / mean inside ``mask`` (0.52 for a Rayleigh envelope)."""
    values = _region_values(img, mask)
    return float(values.std() / values.mean())


def half_width(rho: np.ndarray) -> float:
    """Lag (in samples) where a correlation profile starting at rho[0] = 1 falls to 0.5.

    Between the bracketing lags log(rho) is interpolated linearly in lag^2, exact for a Gaussian
    profile, so grains only ~1 pixel wide are still measured without bias.
    """
    below = np.nonzero(rho < 0.5)[0]
    if below.size == 0:
        raise ValueError("autocorrelation never falls below one half inside the region; use a larger region")
    lag = int(below[0])
    hi, lo = rho[lag - 1], rho[lag]
    if lo <= 0.0:
        return float(lag - 1 + (hi - 0.5) / (hi - lo))
    t = (math.log(0.5) - math.log(hi)) / (math.log(lo) - math.log(hi))
    return float(math.sqrt((lag - 1) ** 2 + t * (lag ** 2 - (lag - 1) ** 2)))
