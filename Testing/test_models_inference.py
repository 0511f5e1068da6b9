"""Model files and the inference engine: round trips, refusals, shapes, dtypes, cancel."""

import json
import pickle
import threading
import zipfile

import numpy as np
import pytest
import torch

from Speckle2SelfLib.engine.inference import Cancelled, Despeckler, check_frames
from Speckle2SelfLib.engine.models import METADATA_FILE, ModelFormatError, export_model, load_model
from Speckle2SelfLib.engine.network import Speckle2SelfNet
from conftest import simulated_frames


@pytest.fixture(scope="module")
def engine(untrained_model):
    return Despeckler.from_file(untrained_model, device="cpu")


def test_torchscript_round_trip_keeps_outputs_and_metadata(tmp_path):
    torch.manual_seed(1)
    net = Speckle2SelfNet(width=4, upsample="resize")
    path = tmp_path / "m.pt"
    meta = export_model(net, path, scales=(1.0, 0.5, 0.25), interpolation="area", name="rt",
                        training={"steps_done": 7})
    loaded = load_model(path)
    assert loaded.metadata == meta
    assert loaded.metadata["width"] == 4 and loaded.metadata["upsample"] == "resize"
    assert loaded.metadata["interpolation"] == "area" and loaded.metadata["training"]["steps_done"] == 7
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        expected = net.inference_module().eval()(x)
        assert torch.equal(loaded.module(x), expected)
    assert not list(tmp_path.glob("*.part")), "no temporary file is left behind"


def test_pickled_checkpoint_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": Speckle2SelfNet(width=4).state_dict()}, path)
    with pytest.raises(ModelFormatError, match="checkpoint or pickle"):
        load_model(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFormatError, match="not a zip"):
        load_model(plain)


def test_truncated_model_file_is_refused(untrained_model, tmp_path):
    data = untrained_model.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated|corrupt|not a TorchScript"):
        load_model(cut)


def test_torchscript_without_metadata_or_with_tampered_weights_is_refused(untrained_model, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(Speckle2SelfNet(width=4).inference_module()), str(bare))
    with pytest.raises(ModelFormatError, match="metadata"):
        load_model(bare)
    # Same archive, metadata claiming other weights.
    meta = json.loads(zipfile.ZipFile(untrained_model).read(
        next(n for n in zipfile.ZipFile(untrained_model).namelist() if n.endswith(METADATA_FILE))))
    meta["weights_sha256"] = "0" * 64
    forged = tmp_path / "forged.pt"
    module = torch.jit.load(str(untrained_model))
    torch.jit.save(module, str(forged), _extra_files={METADATA_FILE: json.dumps(meta)})
    with pytest.raises(ModelFormatError, match="checksum"):
        load_model(forged)


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 101), (3, 37, 101), (1, 64, 48)])
def test_same_shape_dtype_and_range_out(engine, dtype, shape):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo, hi = (info.min // 2, info.max // 2) if info is not None else (-3.5, 12.0)
    arr = (rng.random(shape) * (hi - lo) + lo).astype(dtype)
    before = arr.copy()
    out = engine.denoise(arr)
    assert out.shape == arr.shape and out.dtype == arr.dtype
    frames_in, frames_out = check_frames(arr), check_frames(out)
    for fi, fo in zip(frames_in, frames_out):
        assert fo.min() >= fi.min() and fo.max() <= fi.max()
    np.testing.assert_array_equal(arr, before)   # input never modified


def test_constant_frame_comes_back_unchanged(engine):
    arr = np.full((2, 32, 32), 77, np.uint8)
    np.testing.assert_array_equal(engine.denoise(arr), arr)


def test_blend_one_returns_the_input_and_gamma_darkens(engine):
    rng = np.random.default_rng(1)
    arr = rng.random((48, 48)).astype(np.float32)
    np.testing.assert_allclose(engine.denoise(arr, blend=1.0), arr, atol=1e-6)
    plain, darker = engine.denoise(arr), engine.denoise(arr, gamma=2.0)
    assert darker.mean() < plain.mean()
    with pytest.raises(ValueError, match="blend"):
        engine.denoise(arr, blend=1.5)


def test_progress_reports_every_batch_and_batches_do_not_change_results(engine):
    rng = np.random.default_rng(2)
    arr = rng.random((7, 32, 40)).astype(np.float32)
    calls = []
    out = engine.denoise(arr, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    np.testing.assert_allclose(out, engine.denoise(arr, batch_size=7), atol=1e-5)


def test_iterable_of_frames_streams_through(engine):
    rng = np.random.default_rng(3)
    frames = [rng.random((32, 48)).astype(np.float32) for _ in range(5)]
    out = engine.denoise(iter(frames), batch_size=2)
    assert len(out) == 5 and all(o.shape == (32, 48) for o in out)
    np.testing.assert_allclose(np.stack(out), engine.denoise(np.stack(frames)), atol=1e-5)


def test_cancel_returns_nothing(engine):
    arr = np.random.default_rng(4).random((6, 32, 32)).astype(np.float32)
    event = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        event.set()          # the user clicks Cancel after the first batch

    with pytest.raises(Cancelled):
        engine.denoise(arr, batch_size=2, progress=progress, cancel=event)
    assert seen == [2]
    with pytest.raises(Cancelled):
        engine.denoise(arr, cancel=lambda: True)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 10)), "empty"),
    (np.zeros((1, 1)), "too small"),
    (np.array([[np.nan] * 16] * 16), "NaN"),
    (np.zeros((2, 2, 16, 16)), "4D"),
    (np.zeros((1, 1, 2, 16, 16)), "5D"),
    (np.zeros((64, 64, 3), np.uint8), "RGB"),
    (np.zeros((16, 16), bool), "dtype"),
])
def test_bad_inputs_name_the_problem(engine, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        engine.denoise(bad)


def test_unknown_device_is_refused(untrained_model):
    with pytest.raises(ValueError, match="unknown device"):
        Despeckler.from_file(untrained_model, device="tpu")


# ----------------------------------------------------------------------------- output grey levels

def _stretched_like_the_authors_head(clean: np.ndarray) -> np.ndarray:
    """What an InstanceNorm + ReLU head makes of a clean image: standardised, below-mean black."""
    return np.clip((clean - clean.mean()) / clean.std(), 0.0, 1.0)


def test_fit_grey_levels_gives_a_stretched_output_back_the_inputs_brightness_and_contrast():
    from Speckle2SelfLib.engine.inference import fit_grey_levels

    noisy, clean = simulated_frames(n=1, size=128, seed=3)
    frame, truth = noisy[0].astype(np.float64), clean[0].astype(np.float64)
    stretched = _stretched_like_the_authors_head(truth)
    fitted = fit_grey_levels(stretched, frame)
    # The fitted output predicts the input better than the stretched one, is nearer the clean
    # image's grey levels, and keeps the input's mean brightness.
    assert np.mean((fitted - frame) ** 2) < 0.5 * np.mean((stretched - frame) ** 2)
    assert np.mean(np.abs(fitted - truth)) < 0.5 * np.mean(np.abs(stretched - truth))
    assert abs(fitted.mean() - frame.mean()) < 0.01
    assert fitted.min() >= 0.0 and fitted.max() <= 1.0
    # Grey-level order is kept (a positive slope): the map is monotonic.
    order = np.argsort(stretched.ravel(), kind="stable")
    assert np.all(np.diff(fitted.ravel()[order]) >= -1e-12)


def test_fit_grey_levels_leaves_a_flat_or_inverted_output_as_it_is():
    from Speckle2SelfLib.engine.inference import fit_grey_levels

    frame = np.random.default_rng(0).random((32, 32))
    flat = np.full((32, 32), 0.3)
    np.testing.assert_array_equal(fit_grey_levels(flat, frame), flat)
    inverted = 1.0 - frame
    np.testing.assert_array_equal(fit_grey_levels(inverted, frame), inverted)


def test_bundled_model_keeps_the_input_grey_levels_by_default_and_its_own_on_request():
    noisy, _clean = simulated_frames(n=2, size=128, seed=5)
    frames = np.rint(np.stack(noisy) * 255).astype(np.uint8)
    eng = Despeckler.from_file("speckle2self-carotid-w16-d2-v2", device="cpu", backend="fp32")
    assert eng.metadata["head"] == "norm_relu" and eng.fits_grey_levels("auto") and eng.resolve_refine() == "none"
    fitted = eng.denoise(frames).astype(np.float64)
    np.testing.assert_array_equal(eng.denoise(frames, grey_levels="input"), fitted)
    own = eng.denoise(frames, grey_levels="network").astype(np.float64)
    for f, o, x in zip(fitted, own, frames.astype(np.float64)):
        # The network's own output is contrast-stretched: far more black pixels and a wider
        # spread than the input; the fitted output has the input's mean within 2 grey levels.
        assert abs(f.mean() - x.mean()) < 2.0 < abs(o.mean() - x.mean())
        assert np.mean(o <= x.min()) > 4 * max(np.mean(f <= x.min()), 0.01)
        assert np.mean((f - x) ** 2) < np.mean((o - x) ** 2)
        assert np.corrcoef(f.ravel(), o.ravel())[0, 1] > 0.99     # same image, other grey levels
    # A guided refinement is a weighted mean of input pixels: the network's levels cannot be had
    # with it, so asking for both is refused rather than silently ignored.
    with pytest.raises(ValueError, match="refine 'none'"):
        eng.denoise(frames, grey_levels="network", refine="guided")


def test_linear_head_models_keep_their_grey_levels_unless_asked(trained_model):
    engine = Despeckler.from_file(trained_model, device="cpu", backend="fp32")
    frames = np.rint(np.stack(simulated_frames(n=1, size=64, seed=2)[0]) * 255).astype(np.uint8)
    assert engine.metadata["head"] == "linear" and not engine.fits_grey_levels("auto")
    own = engine.denoise(frames, grey_levels="network")
    np.testing.assert_array_equal(engine.denoise(frames), own)
    assert engine.fits_grey_levels("input")
    fitted = engine.denoise(frames, grey_levels="input")     # asked for: fitted like any other model
    assert not np.array_equal(fitted, own)
    assert abs(fitted.astype(float).mean() - frames.mean()) <= abs(own.astype(float).mean() - frames.mean()) + 0.5


BAD_OUTPUT_OPTIONS = [("grey_levels", bad, "grey_levels must be one of auto, input, network")
                      for bad in ("fit", "", None, 1)] + \
                     [("refine", bad, "refine must be one of auto, guided, none") for bad in ("sharp", "", 1, True)]


@pytest.mark.parametrize("option, bad, message", BAD_OUTPUT_OPTIONS)
def test_unknown_output_option_is_refused_before_any_computation(engine, option, bad, message, monkeypatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the network ran before the option was checked")

    monkeypatch.setattr(engine, "_run_batch", must_not_run)
    frames = np.random.default_rng(0).integers(0, 255, (1, 32, 32)).astype(np.uint8)
    with pytest.raises(ValueError, match=message):
        engine.denoise(frames, **{option: bad})
    with pytest.raises(ValueError, match=message):
        engine.denoise(list(frames), **{option: bad})
