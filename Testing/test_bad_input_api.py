"""The Python API on bad arrays and options, and float volumes with extreme values through the
command line: NaN/Inf refused, huge (+/-3e38) and tiny (< 1e-12) ranges computed in float64,
flat frames returned unchanged with a warning. Issue #16."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from test_bad_input_helpers import assert_refused, run_cli, sha, snapshot
from Speckle2SelfLib.engine.inference import Despeckler, normalise_frame


@pytest.fixture(scope="module")
def engine(untrained_model):
    return Despeckler.from_file(untrained_model, device="cpu")


def _speckle(shape=(40, 48), seed=0):
    return np.random.default_rng(seed).random(shape)


BAD_ARRAYS = {
    "nan": (lambda: np.where(_speckle() > 0.99, np.nan, _speckle()), ValueError, "NaN or infinite"),
    "+inf": (lambda: np.where(_speckle() > 0.99, np.inf, _speckle()).astype(np.float32), ValueError, "infinite"),
    "-inf in frame 2": (lambda: np.stack([_speckle(), _speckle(), np.full((40, 48), -np.inf)]), ValueError,
                        "frame 2"),
    "0-size": (lambda: np.zeros((0, 48)), ValueError, "empty"),
    "0 frames": (lambda: np.zeros((0, 40, 48), np.uint8), ValueError, "empty"),
    "1x1": (lambda: np.ones((1, 1), np.uint8), ValueError, "too small"),
    "1-row": (lambda: np.ones((1, 64), np.float32), ValueError, "too small"),
    "rgb": (lambda: np.zeros((40, 48, 3), np.uint8), ValueError, "RGB"),
    "4d": (lambda: np.zeros((2, 2, 16, 16)), ValueError, "4D"),
    "bool": (lambda: np.ones((16, 16), bool), TypeError, "dtype"),
    "complex": (lambda: np.ones((16, 16), np.complex64), TypeError, "dtype"),
    "object": (lambda: np.array([[object()] * 16] * 16), TypeError, "dtype"),
    "list": (lambda: [[1, 2], [3, 4]], ValueError, "2D"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_array_is_refused_with_its_reason(case, engine):
    make, error, needle = BAD_ARRAYS[case]
    array = make()
    before = np.array(array, copy=True) if isinstance(array, np.ndarray) else None
    with pytest.raises((error, ValueError, TypeError), match=needle):
        engine.denoise(array)
    if before is not None and before.dtype != object:
        np.testing.assert_array_equal(array, before)


BAD_OPTIONS = [dict(gamma=float("nan")), dict(gamma=float("inf")), dict(gamma=0.0), dict(gamma=-2.0),
               dict(blend=float("nan")), dict(blend=1.5), dict(blend=-0.5), dict(batch_size=0),
               dict(batch_size=-1), dict(batch_size=2.5), dict(batch_size=True), dict(gamma="1.5"),
               dict(working_scale="of"), dict(working_scale=9.0), dict(working_scale=float("nan"))]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=[repr(o) for o in BAD_OPTIONS])
def test_bad_option_is_refused(options, engine):
    name = next(iter(options)).replace("_", " ")
    with pytest.raises(ValueError, match=name):
        engine.denoise(_speckle().astype(np.float32), **options)


def test_working_scale_off_means_the_frames_own_resolution_as_on_the_command_line(engine):
    frame = _speckle().astype(np.float32)
    np.testing.assert_array_equal(engine.denoise(frame, working_scale="off"), engine.denoise(frame, working_scale=None))
    assert engine.last_working_scale == 1.0


@pytest.mark.parametrize("dtype, lo, hi", [(np.float32, -3.0e38, 3.0e38), (np.float64, -1.7e308, 1.7e308),
                                           (np.float64, 1.0, 1.0 + 1e-13), (np.float64, -5e-14, 5e-14),
                                           (np.float32, 1e-30, 3e-30), (np.int64, -2 ** 62, 2 ** 62)])
def test_extreme_ranges_are_normalised_in_float64(dtype, lo, hi, engine):
    base = _speckle((48, 56), seed=3)
    frame = (lo * (1.0 - base) + hi * base if dtype != np.int64
             else (lo + base * float(hi - lo)).astype(np.int64)).astype(dtype)
    if frame.min() == frame.max():
        pytest.skip("the range is below the dtype's resolution")
    unit = np.empty(frame.shape, np.float32)
    normalise_frame(frame, unit)
    assert np.isfinite(unit).all() and unit.min() == 0.0 and unit.max() >= 1.0 - 1e-6
    low, high = float(frame.min()), float(frame.max())
    expected = (frame.astype(np.float64) * 0.5 - low * 0.5) / (high * 0.5 - low * 0.5)   # no overflow
    assert np.abs(unit - expected).max() < 1e-5
    out = engine.denoise(frame)
    assert out.dtype == frame.dtype and out.shape == frame.shape
    assert np.isfinite(out.astype(np.float64)).all()
    assert out.min() >= frame.min() and out.max() <= frame.max()
    assert np.unique(out).size > min(10, np.unique(frame).size - 1), "not collapsed to a constant"


def test_flat_frames_come_back_unchanged_with_a_warning(engine):
    stack = np.stack([np.full((32, 40), 3.25, np.float32), _speckle((32, 40)).astype(np.float32)])
    with pytest.warns(UserWarning, match="1 of 2 frame.*flat.*unchanged"):
        out = engine.denoise(stack)
    np.testing.assert_array_equal(out[0], stack[0])


def test_non_finite_model_output_is_an_error_not_a_result(engine, monkeypatch):
    monkeypatch.setattr(engine, "_apply_module", lambda x: x * float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        engine.denoise(_speckle().astype(np.float32))


# ----------------------------------------------------------------------------- float volumes on the CLI

def _volume(tmp_path, voxels: np.ndarray):
    path = tmp_path / "in" / "vol.mha"
    path.parent.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.2, 0.3, 1.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_cli_refuses_non_finite_volumes(bad, tmp_path, untrained_model, capsys):
    voxels = _speckle((3, 32, 40)).astype(np.float32)
    voxels[1, 5, 7] = float(bad)
    path = _volume(tmp_path, voxels)
    before = sha(path)
    result = run_cli(["denoise", path, tmp_path / "out.mha", "--model", untrained_model], capsys)
    assert_refused(result, 2, "vol.mha", "NaN or infinite", "frame 1")
    assert not (tmp_path / "out.mha").exists() and sha(path) == before


@pytest.mark.parametrize("case", ["huge", "tiny", "flat", "one slice"])
def test_cli_float_volume_edge_cases(case, tmp_path, untrained_model, capsys):
    base = _speckle((2, 32, 40), seed=5)
    voxels = {"huge": (base * 6e38 - 3e38).astype(np.float32),
              "tiny": 7.0 + base * 1e-13,
              "flat": np.full((2, 32, 40), -12.5, np.float32),
              "one slice": base[:1].astype(np.float32)}[case]
    path = _volume(tmp_path, voxels)
    before = sha(path)
    out = tmp_path / "out.mha"
    result = run_cli(["denoise", path, out, "--model", untrained_model], capsys)
    assert result.code == 0, result.err
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert back.shape == voxels.shape and back.dtype == voxels.dtype and np.isfinite(back).all()
    assert back.min() >= voxels.min() and back.max() <= voxels.max()
    if case == "flat":
        np.testing.assert_array_equal(back, voxels)
        assert "warning:" in result.err and "flat" in result.err
    else:
        assert np.unique(back).size > 10
    assert sha(path) == before


def test_mha_output_keeps_exactly_the_input_header_fields(tmp_path, untrained_model, capsys):
    voxels = (_speckle((2, 32, 40)) * 255).astype(np.uint8)
    path = _volume(tmp_path, voxels)
    out = tmp_path / "out.mha"
    assert run_cli(["denoise", path, out, "--model", untrained_model], capsys).code == 0

    def fields(p):
        head = p.read_bytes().split(b"ElementDataFile")[0].decode()
        return {line.split("=")[0].strip() for line in head.splitlines() if "=" in line}

    assert fields(out) == fields(path), fields(out) ^ fields(path)
    assert not any(k.startswith("ITK_") for k in fields(out))
    assert snapshot(tmp_path / "in") == {"vol.mha": sha(path)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sitk.ReadImage(str(out))
