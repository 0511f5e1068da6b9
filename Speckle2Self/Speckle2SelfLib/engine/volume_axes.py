"""Which plane of a 3D volume the 2D network despeckles: the plane the ultrasound was acquired in.

A 3D array ``(K, J, I)`` (numpy order of an MRML volume or a SimpleITK image) is cut into 2D
frames along one axis, the *slice axis*, and every frame is despeckled by
:meth:`~Speckle2SelfLib.engine.inference.Despeckler.denoise`. A stacked cine has its B-mode
frames along K; volumes reconstructed from tracked freehand sweeps, 3D probes and resampled or
reoriented volumes have them along another axis. Despeckling constant-depth planes smears the
speckle into blobs, so the choice matters:

* ``"i"``, ``"j"``, ``"k"``: frames normal to that axis, in the array's own order
  (k: rows J, columns I -- what the module always did; j: rows K, columns I; i: rows K, columns J);
* ``"auto"`` (default): the acquisition plane found by :func:`detect_slice_axis` -- from the
  file or node's metadata where it says (a PLUS or Slicer sequence is a stack of frames along K),
  else from the data: the depth axis is the one along which the mean echo level changes most
  (attenuation, the skin line, the bone surface); of the other two, the elevation (the slice axis)
  is the one along which the speckle does not continue (frames imaged separately: a stack, also
  when resampled), else the one whose grain is finer than the axial grain (lateral resolution is
  never better than axial), else the coarser one (a thick elevation beam, as in a reconstructed
  freehand sweep). Frames are then oriented with depth along their rows, as the network was
  trained, so a volume gives the same result whatever the order of its axes. Where the data show
  no clear B-mode plane it keeps K and says so. An oblique acquisition plane is reported and
  despeckled in the nearest axis plane (that measured better than resampling into the plane).
* ``"three"``: despeckle along each of the three axes (depth along the frames' rows where it is
  in the plane) and take the voxel-wise mean (3x the time; benchmarks/volume_slicing.py measures it
  against single planes, and the median).

:func:`despeckle_volume` is the one call (the CLI, the Slicer logic and the benchmark use it);
the choice it made (:class:`SliceChoice`) says what and why, and is recorded on the output
(:data:`ATTRIBUTE`: an MRML node attribute, a MetaImage/NRRD header field).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

#: The choices (API, CLI ``--slice-axis``, the module's combo box and parameter node).
SLICE_AXES = ("auto", "i", "j", "k", "three")
DEFAULT_SLICE_AXIS = "auto"
#: Labels for a GUI combo box, in :data:`SLICE_AXES` order.
SLICE_AXIS_LABELS = {
    "auto": "auto (acquisition plane)",
    "i": "I slices (J-K planes)",
    "j": "J slices (I-K planes)",
    "k": "K slices (I-J planes)",
    "three": "three planes (mean of I, J, K)",
}
#: Parameter-node / scene key, and the attribute (MRML) / header field (files) of the output
#: that records the choice: "<axis>; <reason>".
PARAMETER = "SliceAxis"
ATTRIBUTE = "Speckle2Self.SliceAxis"
HEADER_FIELD = "Speckle2Self_SliceAxis"

#: numpy axis of a (K, J, I) array for each axis name, and back.
AXIS_INDEX = {"k": 0, "j": 1, "i": 2}
AXIS_NAME = {0: "k", 1: "j", 2: "i"}
#: Frame layout (normal, rows, columns) of an explicitly chosen axis: the array's own order.
EXPLICIT_LAYOUT = {"k": (0, 1, 2), "j": (1, 0, 2), "i": (2, 0, 1)}

MIN_SIDE = 8                 # a frame side below this is not despeckled (engine.inference.MIN_SIDE)
MAX_VOXELS = 1_500_000       # the detector looks at a central block of at most this many voxels
#: The depth axis must explain at least this share of the voxel variance by its mean profile,
#: and the grain must be measurable, else "auto" keeps K (no clear B-mode plane).
MIN_DEPTH_TREND = 0.01
#: Angle between the grain's principal directions and the voxel axes above which the
#: acquisition plane is reported as oblique (the estimate runs low: a stack turned by 20 deg
#: measures 10-11 deg, by 40 deg 33-35 deg; benchmarks/volume_slicing.py).
OBLIQUE_DEG = 10.0


def check_slice_axis(slice_axis) -> str:
    """``slice_axis`` (lower case) if it is one of :data:`SLICE_AXES`, else a one-line ValueError."""
    value = slice_axis.lower().strip() if isinstance(slice_axis, str) else slice_axis
    if value not in SLICE_AXES:
        raise ValueError(f"slice axis must be one of {', '.join(SLICE_AXES)}, got {slice_axis!r}; "
                         "use auto to despeckle in the acquisition plane")
    return value


@dataclass
class AxisFeatures:
    """What the detector measured along one axis."""

    size: int
    grain: float          # speckle correlation length in voxels (lag where the residual's correlation is 0.5)
    trend: float          # share of the voxel variance explained by the mean profile along the axis
    correlations: Tuple[float, ...] = ()   # residual correlation at lags 1..4


@dataclass
class SliceChoice:
    """The plane the network runs in: frames normal to ``axis``, rows along ``rows``."""

    axis: str                         # "i", "j", "k" or "three"
    requested: str                    # what was asked for
    reason: str                       # one sentence: why
    rows: Optional[str] = None        # axis along the frames' rows (depth, for auto)
    columns: Optional[str] = None
    source: str = "requested"         # "requested", "metadata", "data", "fallback"
    oblique_deg: Optional[float] = None   # the grain's principal directions off the voxel axes
    features: Dict[str, AxisFeatures] = field(default_factory=dict)

    @property
    def layout(self) -> Tuple[int, int, int]:
        """(normal, rows, columns) as numpy axes of the (K, J, I) array."""
        if self.axis == "three":
            raise ValueError("three-plane mode has no single layout")
        if self.rows is None:
            return EXPLICIT_LAYOUT[self.axis]
        return AXIS_INDEX[self.axis], AXIS_INDEX[self.rows], AXIS_INDEX[self.columns]

    def to_frames(self, volume: np.ndarray) -> np.ndarray:
        """(K, J, I) -> (N, H, W) frames of this plane (a view)."""
        return np.transpose(volume, self.layout)

    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W) frames of this plane -> (K, J, I) (a view)."""
        return np.transpose(frames, np.argsort(self.layout))

    def record(self) -> str:
        """What the output records: "<axis>; <reason>"."""
        return f"{self.axis}; {self.reason}"

    def describe(self) -> str:
        """One line for the user: the plane and why."""
        plane = "three planes (mean)" if self.axis == "three" else \
            f"{self.axis.upper()} slices ({_plane(self.axis)} planes)"
        return f"slice axis {plane}: {self.reason}"


def _plane(axis: str) -> str:
    return {"k": "I-J", "j": "I-K", "i": "J-K"}[axis]


# ----------------------------------------------------------------------------- detection

def _central_block(volume: np.ndarray, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """A central block with every side shrunk by the same factor (the same block whatever the
    order of the axes), at most ``max_voxels``; float32."""
    shape = np.array(volume.shape, dtype=float)
    factor = min(1.0, (max_voxels / max(shape.prod(), 1)) ** (1 / 3))
    sides = np.maximum(np.minimum(shape, 2 * MIN_SIDE), np.round(shape * factor)).astype(int)
    starts = (np.array(volume.shape) - sides) // 2
    block = volume[tuple(slice(s, s + n) for s, n in zip(starts, sides))]
    return np.asarray(block, dtype=np.float32)


def _support(block: np.ndarray) -> np.ndarray:
    """Voxels inside the imaged region: where more than 5% of the block holds its minimum (the
    padding of a reconstructed volume, the black border of a frame), the voxels above it, shrunk
    by 2 along every axis long enough; else all voxels."""
    from scipy import ndimage as ndi

    low = float(block.min())
    at_min = block <= low
    if at_min.mean() < 0.05:
        return np.ones(block.shape, bool)
    inside = ~at_min
    for axis, n in enumerate(block.shape):
        if n >= 16:
            structure = np.zeros((3, 3, 3), bool)
            structure[1, 1, 1] = True
            index = [1, 1, 1]
            for step in (0, 2):
                index[axis] = step
                structure[tuple(index)] = True
            inside = ndi.binary_erosion(inside, structure, iterations=2)
    return inside


def _grain(correlations: Sequence[float]) -> float:
    """Lag (voxels) at which the correlation falls to 0.5: interpolated between lags, else
    extrapolated as an exponential decay."""
    c = [1.0] + [float(v) for v in correlations]
    for lag in range(1, len(c)):
        if c[lag] <= 0.5:
            if c[lag - 1] <= 0.5 or c[lag - 1] == c[lag]:
                return float(lag - 1)
            return lag - 1 + (c[lag - 1] - 0.5) / (c[lag - 1] - c[lag])
    last = len(c) - 1
    return last * math.log(0.5) / math.log(min(max(c[last], 1e-6), 0.999))


def is_decorrelated(features: AxisFeatures) -> bool:
    """Whether the speckle does not continue along an axis: low correlation at one voxel, and what
    there is (above the level at 4 voxels, which tissue structure leaves in the residual) gone at
    two -- frames imaged separately (a stack, even resampled), not a point-spread function."""
    c1, c2, _c3, c4 = features.correlations
    return c1 < 0.6 and (c1 - c4 < 0.1 or (c2 - c4) < 0.15 * (c1 - c4))


def measure_axes(volume: np.ndarray) -> Dict[str, AxisFeatures]:
    """Speckle grain and mean-profile trend along each axis of a (K, J, I) array (see the module)."""
    from scipy import ndimage as ndi

    block = _central_block(volume)
    inside = _support(block)
    residual = block - ndi.uniform_filter(block, 7, mode="reflect")
    values = block[inside]
    total_var = float(values.var()) if values.size > 1 else 0.0
    features = {}
    for axis in range(3):
        n = block.shape[axis]
        correlations = []
        for lag in (1, 2, 3, 4):
            if lag >= n:
                correlations.append(0.0)
                continue
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(0, n - lag), slice(lag, n)
            both = inside[tuple(a)] & inside[tuple(b)]
            x, y = residual[tuple(a)][both], residual[tuple(b)][both]
            ok = x.size > 10 and x.std() > 0 and y.std() > 0
            correlations.append(float(np.corrcoef(x, y)[0, 1]) if ok else 0.0)
        others = tuple(o for o in range(3) if o != axis)
        count = inside.sum(axis=others)
        profile = np.where(inside, block, 0).sum(axis=others) / np.maximum(count, 1)
        used = count > 0.05 * max(int(count.max()), 1)
        weights = count[used].astype(float)
        trend = 0.0
        if used.sum() > 2 and total_var > 0:
            mean = np.average(profile[used], weights=weights)
            trend = float(np.average((profile[used] - mean) ** 2, weights=weights) / total_var)
        features[AXIS_NAME[axis]] = AxisFeatures(int(volume.shape[axis]), _grain(correlations), trend,
                                                 tuple(round(c, 3) for c in correlations))
    return features


def _shifted_correlation(residual: np.ndarray, inside: np.ndarray, shift: Tuple[int, int, int]) -> float:
    """Correlation of the residual with itself moved by ``shift`` voxels, inside the support."""
    a, b = [], []
    for s, n in zip(shift, residual.shape):
        a.append(slice(max(0, -s), n - max(0, s)))
        b.append(slice(max(0, s), n - max(0, -s)))
    both = inside[tuple(a)] & inside[tuple(b)]
    x, y = residual[tuple(a)][both], residual[tuple(b)][both]
    if x.size < 10 or not x.std() > 0 or not y.std() > 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def plane_tilts(volume: np.ndarray) -> Dict[str, float]:
    """For each pair of axes, the angle (degrees, -45..45) by which the speckle grain's principal
    directions in that plane are turned off the axes: from the residual's correlation at one-voxel
    steps along the two axes and both diagonals (a quadratic fit of 1 - correlation). 0 where the
    grain is about as long along both axes (no direction to measure)."""
    from scipy import ndimage as ndi

    block = _central_block(volume, MAX_VOXELS // 2)
    inside = _support(block)
    residual = block - ndi.uniform_filter(block, 7, mode="reflect")
    tilts = {}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if min(block.shape[a], block.shape[b]) < MIN_SIDE:
            continue

        def lag(da, db):
            shift = [0, 0, 0]
            shift[a], shift[b] = da, db
            return 1.0 - _shifted_correlation(residual, inside, tuple(shift))

        qaa, qbb = lag(1, 0), lag(0, 1)
        qab = (lag(1, 1) - lag(1, -1)) / 4.0
        anisotropy = math.hypot(qaa - qbb, 2 * qab) / max(qaa + qbb, 1e-9)
        angle = 0.5 * math.degrees(math.atan2(2 * qab, qaa - qbb)) if anisotropy > 0.15 else 0.0
        angle = (angle + 45.0) % 90.0 - 45.0          # off the nearest axis
        tilts[AXIS_NAME[a] + AXIS_NAME[b]] = round(angle, 1)
    return tilts


def obliqueness_deg(volume: np.ndarray) -> float:
    """Largest angle (degrees) by which the grain's principal directions are turned off the voxel
    axes in any axis plane (:func:`plane_tilts`): about 0 when the acquisition plane lies along them."""
    tilts = plane_tilts(volume)
    return float(max((abs(t) for t in tilts.values()), default=0.0))


def detect_slice_axis(volume: np.ndarray, frames_along_k: Optional[str] = None,
                      depth_axis: Optional[str] = None) -> SliceChoice:
    """The acquisition plane of a (K, J, I) array (see the module).

    ``frames_along_k``: where the metadata says the array is a stack of 2D frames along K (a PLUS
    or Slicer sequence, a multi-frame DICOM), the reason, e.g. "PLUS sequence (Seq_Frame fields)";
    ``depth_axis`` then names the in-frame depth axis where the metadata gives it (PLUS
    UltrasoundImageOrientation), else it is measured.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a volume is (K, J, I); got {volume.ndim}D shape {volume.shape}")
    sizes = {AXIS_NAME[a]: int(n) for a, n in enumerate(volume.shape)}
    if frames_along_k:
        rows, columns = ("j", "i") if depth_axis in (None, "j") else ("i", "j")
        if depth_axis is None:
            return SliceChoice("k", "auto", f"{frames_along_k}: a stack of 2D frames along K", source="metadata")
        return SliceChoice("k", "auto", f"{frames_along_k}: a stack of 2D frames along K, depth along "
                           f"{rows.upper()}", rows, columns, source="metadata")
    if sizes["k"] == 1:
        return SliceChoice("k", "auto", "a single 2D image (K = 1)", source="data")
    eligible = [name for name in ("k", "j", "i") if sizes[name] >= MIN_SIDE]
    if len(eligible) < 2:
        return SliceChoice("k", "auto", f"too small to slice otherwise ({'x'.join(map(str, volume.shape[::-1]))} "
                           "voxels); kept K", source="fallback")
    if len(eligible) == 2:
        normal = next(name for name in ("k", "j", "i") if name not in eligible)
        if volume.dtype.kind == "f" and not np.isfinite(volume).all():
            return SliceChoice(normal, "auto", f"only the {'-'.join(n.upper() for n in eligible)} plane has frames "
                               f"of {MIN_SIDE}+ voxels", source="data")
        features = measure_axes(volume)
        rows, columns = sorted(eligible, key=lambda n: -features[n].trend)
        return SliceChoice(normal, "auto", f"only {_plane(normal)} planes have {MIN_SIDE}+ voxels a side; depth along "
                           f"{rows.upper()} (mean level varies most)", rows, columns, "data", None, features)
    features = measure_axes(volume)
    ranked = sorted(eligible, key=lambda n: -features[n].trend)
    depth = ranked[0]
    grains = {n: features[n].grain for n in eligible}
    if features[depth].trend < MIN_DEPTH_TREND or grains[depth] < 0.3:
        why = "no depth trend" if features[depth].trend < MIN_DEPTH_TREND else "no speckle grain along depth"
        return SliceChoice("k", "auto", f"no clear B-mode plane in the data ({why}); kept K", source="fallback",
                           features=features)
    others = [n for n in eligible if n != depth]
    not_finer = [n for n in others if grains[n] >= grains[depth]]
    unlinked = [n for n in others if is_decorrelated(features[n])]
    if len(unlinked) == 1:
        normal = unlinked[0]
        lateral = next(n for n in others if n != normal)
        c = features[normal].correlations
        why_lateral = (f"the speckle does not continue along {normal.upper()} (correlation {c[0]:.2f}, {c[1]:.2f} at "
                       f"1, 2 voxels, {c[3]:.2f} at 4: frames imaged separately)")
    elif len(not_finer) == 1:
        lateral = not_finer[0]
        normal = next(n for n in others if n != lateral)
        why_lateral = (f"{normal.upper()} grain {grains[normal]:.1f} voxels is finer than the axial "
                       f"{grains[depth]:.1f} (frames decorrelated along {normal.upper()})")
    else:
        pick = min if not_finer else max
        lateral = pick(others, key=lambda n: grains[n])
        normal = next(n for n in others if n != lateral)
        why_lateral = (f"{lateral.upper()} grain {grains[lateral]:.1f} voxels is closest to the axial "
                       f"{grains[depth]:.1f} ({normal.upper()}: {grains[normal]:.1f}, the elevation)")
    reason = (f"depth along {depth.upper()} (mean level varies most: {features[depth].trend:.2f} of the variance), "
              f"lateral along {lateral.upper()}: {why_lateral}")
    choice = SliceChoice(normal, "auto", reason, depth, lateral, "data", None, features)
    choice.oblique_deg = obliqueness_deg(volume)
    if choice.oblique_deg > OBLIQUE_DEG:
        choice.reason += (f"; the acquisition plane looks oblique ({choice.oblique_deg:.0f} deg off the voxel axes): "
                          "despeckled in the nearest axis plane")
    return choice


def choose_slice_axis(volume: np.ndarray, slice_axis: str = DEFAULT_SLICE_AXIS, frames_along_k: Optional[str] = None,
                      depth_axis: Optional[str] = None) -> SliceChoice:
    """:class:`SliceChoice` for ``slice_axis`` (auto: :func:`detect_slice_axis`)."""
    slice_axis = check_slice_axis(slice_axis)
    if slice_axis == "auto":
        return detect_slice_axis(volume, frames_along_k, depth_axis)
    shape = np.shape(volume)
    if len(shape) != 3:
        raise ValueError(f"a volume is (K, J, I); got {len(shape)}D shape {shape}")
    if slice_axis == "three":
        small = [AXIS_NAME[a].upper() for a, n in enumerate(shape) if n < MIN_SIDE]
        if small:
            raise ValueError(f"three-plane mode needs {MIN_SIDE}+ voxels along every axis, {', '.join(small)} has "
                             f"fewer ({'x'.join(map(str, shape[::-1]))} voxels I x J x K); use --slice-axis auto or k")
        return SliceChoice("three", "three", "mean of the I, J and K slice passes")
    normal, rows, columns = EXPLICIT_LAYOUT[slice_axis]
    if min(shape[rows], shape[columns]) < MIN_SIDE:
        raise ValueError(f"{slice_axis.upper()} slices of this volume ({'x'.join(map(str, shape[::-1]))} voxels "
                         f"I x J x K) are {shape[rows]}x{shape[columns]}, below {MIN_SIDE}x{MIN_SIDE}; "
                         "choose another slice axis or auto")
    return SliceChoice(slice_axis, slice_axis, "requested")


# ----------------------------------------------------------------------------- despeckling

def despeckle_volume(despeckler, volume: np.ndarray, slice_axis: str = DEFAULT_SLICE_AXIS, *,
                     progress: Optional[Callable[[int, int], None]] = None, cancel=None,
                     frames_along_k: Optional[str] = None, depth_axis: Optional[str] = None,
                     choice: Optional[SliceChoice] = None, combine: str = "mean",
                     **options) -> Tuple[np.ndarray, SliceChoice]:
    """Despeckle a (K, J, I) array in the plane ``slice_axis`` picks; returns (result, choice).

    ``despeckler``: a :class:`~Speckle2SelfLib.engine.inference.Despeckler`; ``options`` go to its
    ``denoise`` (batch_size, gamma, blend, working_scale, grey_levels, refine). ``progress(done,
    total)`` counts frames over all passes. The result has the input's shape and dtype.
    ``choice``: a choice made before (e.g. on the main thread), else it is made here.
    ``combine``: how three-plane mode joins its passes, "mean" (default: measured better) or "median".
    """
    volume = np.asarray(volume)
    if choice is None:
        choice = choose_slice_axis(volume, slice_axis, frames_along_k, depth_axis)
    if choice.axis != "three":
        frames = np.ascontiguousarray(choice.to_frames(volume))
        out = despeckler.denoise(frames, progress=progress, cancel=cancel, **options)
        return np.ascontiguousarray(choice.from_frames(out)), choice
    if combine not in ("mean", "median"):
        raise ValueError(f"combine must be mean or median, got {combine!r}")
    passes = three_plane_passes(volume)
    total = sum(volume.shape)
    done = 0
    results = []
    for one in passes:
        start = done

        def step(d, _t, start=start):
            if progress is not None:
                progress(start + d, total)

        frames = np.ascontiguousarray(one.to_frames(volume))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # flat-frame notes would repeat for every pass
            out = despeckler.denoise(frames, progress=step, cancel=cancel, **options)
        results.append(one.from_frames(out).astype(np.float64))
        done += len(frames)
    combined = np.mean(results, axis=0) if combine == "mean" else np.median(np.stack(results), axis=0)
    if volume.dtype.kind in "ui":
        combined = np.rint(combined)
    return combined.astype(volume.dtype), choice


def three_plane_passes(volume: np.ndarray):
    """The K, J and I passes of three-plane mode: frames with the depth axis (measured, where the
    data show one) along their rows where it lies in the plane, else in the array's own order."""
    depth = None
    if min(np.shape(volume)) >= MIN_SIDE:
        features = measure_axes(volume)
        best = max(features, key=lambda n: features[n].trend)
        depth = best if features[best].trend >= MIN_DEPTH_TREND else None
    passes = []
    for axis in ("k", "j", "i"):
        one = SliceChoice(axis, "three", "three-plane pass")
        if depth is not None and depth != axis:
            one.rows, one.columns = depth, next(n for n in ("k", "j", "i") if n not in (axis, depth))
        passes.append(one)
    return passes


def metadata_hint(image) -> Tuple[Optional[str], Optional[str]]:
    """(frames_along_k reason, depth axis) from a SimpleITK image's metadata: a PLUS sequence
    (Seq_Frame fields) is a stack of frames along K; its UltrasoundImageOrientation (e.g. "MF",
    "MFA": the second letter pair names the far-depth axis) gives the depth axis."""
    keys = list(image.GetMetaDataKeys()) if hasattr(image, "GetMetaDataKeys") else []
    if not any(k.startswith("Seq_Frame") for k in keys):
        return None, None
    depth = None
    if "UltrasoundImageOrientation" in keys:
        orientation = image.GetMetaData("UltrasoundImageOrientation").strip().upper()
        if len(orientation) >= 2 and orientation[1] in "FN":
            depth = "j"
        elif len(orientation) >= 2 and orientation[0] in "FN":
            depth = "i"
    return "PLUS sequence (Seq_Frame fields)", depth


def despeckle_frames(despeckler, data, slice_axis: str = DEFAULT_SLICE_AXIS, *, report=print, **options) -> np.ndarray:
    """Despeckle the frames of a file read by :func:`Speckle2SelfLib.fileio.imageio.read_frames`
    (the CLI): a 3D volume in the plane ``slice_axis`` picks, recorded in the output's header
    (:data:`HEADER_FIELD`, written by ``write_like``) and reported with ``report``; 2D images,
    sequences and DICOM frames frame by frame (their frames are the acquisition planes). The header
    records the choice wherever there was one (not for a volume too thin to slice another way)."""
    slice_axis = check_slice_axis(slice_axis)
    frames = data.frames
    hint = None
    if data.kind == "sequence":
        hint = metadata_hint(data.source) if data.source is not None else ("sequence", None)
        hint = hint if hint[0] else ("sequence (Seq_Frame fields)", None)
    elif data.kind == "dicom":
        hint = ("DICOM frames", None)
    if data.is_2d or frames.shape[0] == 1:
        return despeckler.denoise(frames, **options)
    if hint is not None and slice_axis == "auto":
        choice = SliceChoice("k", "auto", f"{hint[0]}: a stack of 2D frames along K", source="metadata")
    else:
        choice = choose_slice_axis(frames, slice_axis)
    result, choice = despeckle_volume(despeckler, frames, choice=choice, **options)
    if report is not None and data.kind == "volume":
        report(choice.describe())
    source = data.source
    chose = slice_axis != "auto" or hint is not None or min(frames.shape) >= MIN_SIDE
    if chose and hasattr(source, "SetMetaData"):   # a volume with one possible plane keeps its header as it was
        source.SetMetaData(HEADER_FIELD, choice.record())
    return result


def is_k_frames(choice: Optional[SliceChoice]) -> bool:
    """Whether ``choice`` despeckles the array as it is: frames along K, rows J (no choice: yes)."""
    return choice is None or (choice.axis != "three" and choice.layout == (0, 1, 2))


def record_on_node(node, choice: Optional[SliceChoice]):
    """Record ``choice`` on an output MRML node (attribute :data:`ATTRIBUTE`); returns the node."""
    if node is not None and choice is not None:
        node.SetAttribute(ATTRIBUTE, choice.record())
    return node


def choose_volume_axis(volume: np.ndarray, slice_axis: str = DEFAULT_SLICE_AXIS) -> Optional[SliceChoice]:
    """The choice for a volume node's (K, J, I) voxels; None for a single 2D image (K = 1), which
    has only one plane. Logged (``logging.info``) for the Python console and Slicer's log."""
    import logging

    if np.shape(volume)[0] == 1 and check_slice_axis(slice_axis) in ("auto", "k"):
        return None
    choice = choose_slice_axis(volume, slice_axis)
    logging.info("Speckle2Self: %s", choice.describe())
    return choice


#: The module's parameter-node field (``@parameterNodeWrapper``: ``sliceAxis: Annotated[str,
#: Choice(list(SLICE_AXES))] = DEFAULT_SLICE_AXIS``), saved with the scene.
SLICE_AXIS_PARAMETER = "sliceAxis"


def read_parameter(parameter_node) -> str:
    """The slice axis stored in the module's parameter node (``DEFAULT_SLICE_AXIS`` when unset);
    a ValueError naming the field for a value that is not one of :data:`SLICE_AXES`."""
    value = parameter_node.GetParameter(SLICE_AXIS_PARAMETER) if parameter_node is not None else ""
    if not value:
        return DEFAULT_SLICE_AXIS
    try:
        return check_slice_axis(value)
    except ValueError as err:
        raise ValueError(f"parameter {SLICE_AXIS_PARAMETER} of the Speckle2Self parameter node: {err}") from None


def write_parameter(parameter_node, slice_axis: str) -> None:
    """Store a (checked) slice axis in the module's parameter node."""
    parameter_node.SetParameter(SLICE_AXIS_PARAMETER, check_slice_axis(slice_axis))
