"""Image-quality metrics for despeckling: PSNR, SSIM, GLCM homogeneity and speckle SNR.

Full-reference metrics (PSNR, SSIM) compare an image with a reference of the same shape; the
others are no-reference statistics of one image or of regions of it (boolean masks).

LPIPS is not provided: it needs pretrained network weights that cannot be downloaded in the
project's build environment, and torchvision (which the usual implementation imports) is not
importable beside the CPU torch build used here. Metrics that only the benchmarks report (ENL,
CNR, singular-value decay) are in benchmarks/benchlib/quality.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# scikit-image is imported inside the functions that use it: Slicer loads this package with
# the module, and Slicer's Python does not ship scikit-image.

GLCM_DISTANCES = (1,)
GLCM_ANGLES_DEG = (0.0, 45.0, 90.0, 135.0)
GLCM_LEVELS = 256


def as_image(img: np.ndarray, name: str = "image") -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must have an integer or float dtype, got {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _default_data_range(*images: np.ndarray) -> float:
    """255 / 65535 for uint8 / uint16, 1.0 for float images inside [0, 1]; otherwise ask."""
    dtypes = {img.dtype for img in images}
    if dtypes == {np.dtype(np.uint8)}:
        return 255.0
    if dtypes == {np.dtype(np.uint16)}:
        return 65535.0
    if all(np.issubdtype(d, np.floating) for d in dtypes) and all(
            img.min() >= 0.0 and img.max() <= 1.0 for img in images):
        return 1.0
    raise ValueError("cannot infer data_range for these dtypes/values; pass data_range "
                     "(e.g. 255 for 8-bit images, 1.0 for images scaled to [0, 1])")


def _pair(reference: np.ndarray, image: np.ndarray):
    ref = as_image(reference, "reference")
    img = as_image(image, "image")
    if ref.shape != img.shape:
        raise ValueError(f"reference shape {ref.shape} differs from image shape {img.shape}")
    return ref, img


def psnr(reference: np.ndarray, image: np.ndarray, data_range: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE) (inf when identical).

    data_range: peak-to-peak range of the pixel values; None infers 255 (uint8), 65535 (uint16)
    or 1.0 (floats inside [0, 1]).
    """
    ref, img = _pair(reference, image)
    rng = _default_data_range(ref, img) if data_range is None else float(data_range)
    mse = float(np.mean((ref.astype(np.float64) - img.astype(np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    from skimage.metrics import peak_signal_noise_ratio
    return float(peak_signal_noise_ratio(ref.astype(np.float64), img.astype(np.float64), data_range=rng))


def ssim(reference: np.ndarray, image: np.ndarray, data_range: Optional[float] = None) -> float:
    """Mean structural similarity (scikit-image) with Wang et al. (2004) settings: 11x11 Gaussian
    window of sigma 1.5, population covariance, K1 = 0.01, K2 = 0.03.

    data_range as in :func:`psnr`.
    """
    ref, img = _pair(reference, image)
    if min(ref.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {ref.shape}")
    rng = _default_data_range(ref, img) if data_range is None else float(data_range)
    from skimage.metrics import structural_similarity
    return float(structural_similarity(ref.astype(np.float64), img.astype(np.float64), data_range=rng,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def affine_fit(image: np.ndarray, reference: np.ndarray, clip: Optional[Sequence[float]] = None) -> np.ndarray:
    """``gain * image + offset`` fitted to ``reference`` by least squares (optionally clipped).

    A despeckler may map grey levels differently from the reference's display scale (e.g. a
    lifted black level); PSNR/SSIM after this fit score structure, not the grey-scale mapping.
    """
    x = image.astype(np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], axis=1)
    (gain, offset), *_ = np.linalg.lstsq(design, reference.astype(np.float64).ravel(), rcond=None)
    fitted = gain * image.astype(np.float64) + offset
    return np.clip(fitted, *clip) if clip is not None else fitted


def _quantise(img: np.ndarray, levels: int, data_range: Optional[float]) -> np.ndarray:
    """Grey levels 0..levels-1 over [0, data_range] (uint8 images with 256 levels stay as they are)."""
    rng = _default_data_range(img) if data_range is None else float(data_range)
    scaled = np.clip(img.astype(np.float64) / rng, 0.0, 1.0)
    return np.minimum(np.floor(scaled * levels), levels - 1).astype(np.uint16 if levels > 256 else np.uint8)


def glcm_homogeneity(image: np.ndarray, data_range: Optional[float] = None,
                     levels: int = GLCM_LEVELS, distances: Sequence[int] = GLCM_DISTANCES,
                     angles_deg: Sequence[float] = GLCM_ANGLES_DEG) -> float:
    """Grey-level co-occurrence homogeneity sum_ij p(i, j) / (1 + (i - j)^2), in (0, 1].

    Defaults: the image is quantised to ``levels`` = 256 grey levels over [0, data_range]
    (8-bit display levels: a uint8 image is used as is), pixel distance 1, angles 0, 45, 90 and
    135 degrees, symmetric and normalised matrices (scikit-image ``graycomatrix``), the property
    averaged over distances and angles. Smoother images score higher; a constant image scores 1.
    """
    img = as_image(image)
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    quantised = _quantise(img, levels, data_range)
    from skimage.feature import graycomatrix, graycoprops
    glcm = graycomatrix(quantised, distances=list(distances), angles=list(np.deg2rad(angles_deg)),
                        levels=levels, symmetric=True, normed=True)
    return float(graycoprops(glcm, "homogeneity").mean())


def region_values(image: np.ndarray, mask: Optional[np.ndarray], name: str = "mask") -> np.ndarray:
    img = as_image(image)
    if mask is None:
        values = img.ravel()
    else:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise TypeError(f"{name} must be a boolean array, got dtype {m.dtype}")
        if m.shape != img.shape:
            raise ValueError(f"{name} shape {m.shape} differs from image shape {img.shape}")
        values = img[m]
    if values.size < 2:
        raise ValueError(f"{name} selects {values.size} pixel(s); a region needs at least 2")
    return values.astype(np.float64)


def speckle_snr(image: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Speckle signal-to-noise ratio mean / std over ``mask`` (1.91 for a Rayleigh amplitude)."""
    values = region_values(image, mask)
    std = values.std()
    return float("inf") if std == 0.0 else float(values.mean() / std)
