"""Command-line edge cases found in a review: DICOM value tags, DICOM files
named without .dcm, options given on --resume, the preview inside a training folder, SIGTERM
in forked children, a single --frame into a picture, an infinite simulator option."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from test_bad_input_helpers import assert_refused, run_cli, snapshot, speckle
from test_bad_input_readers import write_dicom
from Speckle2SelfLib.cli.main import _sigterm_handler, _Terminated
from Speckle2SelfLib.fileio.imageio import iter_inputs, read_frames, write_like

TINY_TRAIN = ["--crop", "32", "--batch", "2", "--width", "4", "--depth", "2", "--device", "cpu"]


def write_signed_dicom(path: Path, pixels: np.ndarray) -> None:
    """A CT-like signed 16-bit DICOM with modality (rescale) and display (window) tags."""
    write_dicom(path, np.zeros(pixels.shape, np.uint8))
    ds = pydicom.dcmread(str(path))
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_signed_dicom_output_stays_signed_with_valid_value_tags(tmp_path, untrained_model, capsys):
    rng = np.random.default_rng(0)
    src, out = tmp_path / "ct.dcm", tmp_path / "out.dcm"
    write_signed_dicom(src, rng.normal(0, 500, (48, 64)))
    assert run_cli(["denoise", src, out, "--model", untrained_model], capsys).code == 0
    ds = pydicom.dcmread(str(out))
    pixels = ds.pixel_array
    assert pixels.dtype == np.int16 and ds.PixelRepresentation == 1
    assert pixels.min() < 0, "stored values keep their sign, so the rescale tags still describe them"
    assert float(ds.RescaleIntercept) == -1024


def test_stretched_dicom_output_drops_the_input_value_tags(tmp_path):
    src = tmp_path / "ct.dcm"
    write_signed_dicom(src, np.full((8, 8), -300))
    like = read_frames(src)
    write_like(tmp_path / "out.dcm", np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8), like)
    ds = pydicom.dcmread(str(tmp_path / "out.dcm"))
    assert ds.pixel_array.dtype == np.uint8 and ds.pixel_array.max() == 255
    for tag in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        assert tag not in ds, f"{tag} of the input no longer describes the 0..255 pixels"


def test_dicom_files_without_extension_are_found_in_folders(tmp_path, untrained_model, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    write_dicom(folder / "IM0001", speckle((40, 48)))
    write_dicom(folder / "1.2.840.99", speckle((40, 48), seed=1))
    (folder / "notes").write_text("not an image")
    write_dicom(folder / "DICOMDIR", speckle((8, 8)))       # an index, never an image to despeckle
    assert sorted(p.name for p in iter_inputs([str(folder)])) == ["1.2.840.99", "IM0001"]
    result = run_cli(["denoise", folder, tmp_path / "out", "--model", untrained_model], capsys)
    assert result.code == 0, result.err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["1.2.840.99.dcm", "IM0001.dcm"]
    assert read_frames(tmp_path / "out" / "IM0001.dcm").frames.shape == (1, 40, 48)


@pytest.fixture
def training_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(speckle((64, 64), seed=k)).save(folder / f"f{k}.png")
    return folder


def test_fine_tuning_records_its_start_and_uses_the_loss_it_is_given(training_folder, tmp_path, capsys):
    from Speckle2SelfLib.engine.inference import cpu_has_native_bf16
    from Speckle2SelfLib.engine.models import bundled_model_path, file_sha256, load_model

    bundled = bundled_model_path()
    start = load_model(bundled).metadata
    assert start["training"]["edge_sigma"]            # the default model's own edge-aware consistency ...
    tiny = ["--steps", "1", "--crop", "32", "--batch", "2", "--preview-every", "0"]
    trained = {}
    for case, options in {"plain": [], "edge": ["--edge-sigma", "0.01"]}.items():
        out = tmp_path / f"{case}.pt"
        assert run_cli(["train", training_folder, "--out", out, "--init", "default", *tiny, *options],
                       capsys).code == 0
        trained[case] = load_model(out).metadata["training"]
    # ... is not carried into fine-tuning, which adapted far better with the paper's loss (benchmarks/adaptation.py)
    assert trained["plain"]["edge_sigma"] is None and trained["edge"]["edge_sigma"] == 0.01
    # the fine-tuned model says what it started from, and whether mixed precision really ran
    assert trained["plain"]["started_from"] == {"name": start["name"], "file": bundled.name,
                                                "sha256": file_sha256(bundled),
                                                "weights_sha256": start["weights_sha256"]}
    assert trained["plain"]["amp"] is cpu_has_native_bf16()


def test_resume_applies_training_settings_and_a_new_stopping_rule(training_folder, tmp_path, capsys):
    from Speckle2SelfLib.engine.models import load_model

    first, second = tmp_path / "a" / "m.pt", tmp_path / "b" / "m.pt"
    first.parent.mkdir(), second.parent.mkdir()
    assert run_cli(["train", training_folder, "--out", first, "--steps", "2", *TINY_TRAIN], capsys).code == 0
    result = run_cli(["train", training_folder, "--out", second, "--resume", first.with_suffix(".ckpt"),
                      "--epochs", "2", "--batch", "1", "--lr", "0.002"], capsys)
    assert result.code == 0, result.err
    training = load_model(second).metadata["training"]
    assert training["steps_done"] > 2, "the checkpoint's --steps 2 no longer stops the resumed run"
    assert training["batch"] == 1 and training["lr"] == 0.002
    assert training["steps"] is None and training["epochs"] == 2


def test_resume_refuses_options_the_checkpoint_fixes(training_folder, tmp_path, capsys):
    first = tmp_path / "m.pt"
    assert run_cli(["train", training_folder, "--out", first, "--steps", "1", *TINY_TRAIN], capsys).code == 0
    before = snapshot(tmp_path)
    result = run_cli(["train", training_folder, "--out", tmp_path / "n.pt", "--resume", first.with_suffix(".ckpt"),
                      "--steps", "3", "--width", "8", "--consistency", "mse"], capsys)
    assert_refused(result, 2, "--width", "--consistency", "cannot change when resuming", "--init")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("given, key, value, changed, refused", [
    (["--edge-sigma", "0.015"], "edge_sigma", 0.015, ["--edge-sigma", "0.03"],
     [(["--edge-sigma", "0"], "--edge-sigma")]),
    (["--edge-sigma", "0.0075", "--edge-power", "0.5"], "edge_power", 0.5, ["--edge-power", "0.7"],
     [(["--edge-power", "0.5"], "give --edge-sigma"),                  # a power with no edge weight to change
      (["--edge-sigma", "0.01", "--edge-power", "1.5"], "--edge-power")]),
    (["--consistency-weight", "0.25"], "consistency_weight", 0.25, ["--consistency-weight", "0.5"],
     [(["--consistency-weight", "0"], "--consistency-weight"), (["--consistency-weight", "nan"], "--consistency-weight")]),
    (["--seed", "5"], "seed", 5, ["--seed", "0"], [(["--seed", "-1"], "--seed")]),     # 0 is a value, not "left out"
])
def test_loss_options_are_recorded_fixed_on_resume_and_checked(training_folder, tmp_path, capsys,
                                                                    given, key, value, changed, refused):
    from Speckle2SelfLib.engine.models import load_model

    model = tmp_path / "m.pt"
    result = run_cli(["train", training_folder, "--out", model, "--steps", "2", *given, *TINY_TRAIN], capsys)
    assert result.code == 0, result.err
    assert load_model(model).metadata["training"][key] == value
    before = snapshot(tmp_path)
    result = run_cli(["train", training_folder, "--out", tmp_path / "n.pt", "--resume", model.with_suffix(".ckpt"),
                      "--steps", "3", *changed], capsys)
    assert_refused(result, 2, changed[0], "cannot change when resuming")
    for options, needle in refused:
        result = run_cli(["train", training_folder, "--out", tmp_path / "o.pt", "--steps", "1", *options,
                          *TINY_TRAIN], capsys)
        assert_refused(result, 2, needle)
    assert snapshot(tmp_path) == before


def test_fine_tuning_never_writes_over_its_starting_model_even_a_bundled_one_named(training_folder, capsys):
    from Speckle2SelfLib.engine.models import bundled_model_path, file_sha256

    bundled = bundled_model_path()
    checksum = file_sha256(bundled)
    for init in ("default", bundled.stem):
        result = run_cli(["train", training_folder, "--out", bundled, "--init", init, "--steps", "1", *TINY_TRAIN],
                         capsys)
        assert_refused(result, 2, "overwrite")
    assert file_sha256(bundled) == checksum and not bundled.with_suffix(".ckpt").exists()


def test_preview_inside_the_training_folder_is_refused(training_folder, capsys):
    before = snapshot(training_folder)
    result = run_cli(["train", training_folder, "--out", training_folder / "m.pt", "--steps", "1", *TINY_TRAIN],
                     capsys)
    assert_refused(result, 2, "m.preview.png", "training data", "--preview-every 0")
    assert snapshot(training_folder) == before
    result = run_cli(["train", training_folder, "--out", training_folder / "m.pt", "--steps", "1",
                      "--preview-every", "0", *TINY_TRAIN], capsys)
    assert result.code == 0 and not (training_folder / "m.preview.png").exists()


def test_sigterm_handler_raises_in_its_process_and_exits_quietly_in_a_fork():
    handler = _sigterm_handler(os.getpid())
    with pytest.raises(_Terminated):
        handler(signal.SIGTERM, None)
    child = os.fork()
    if child == 0:          # the forked child: the inherited handler must end it, not raise
        try:
            handler(signal.SIGTERM, None)
        finally:
            os._exit(99)    # reached only if the handler returned or raised
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM


def _three_frame_volume(path: Path) -> Path:
    import SimpleITK as sitk

    yy, xx = np.mgrid[:64, :64]
    frame = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 14 ** 2, 5, 160).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([frame] * 3)), str(path))
    return path


def test_segment_one_frame_of_a_volume_into_a_picture(tmp_path, capsys):
    pytest.importorskip("vtk")
    volume = _three_frame_volume(tmp_path / "v.mha")
    result = run_cli(["segment", volume, "--seed", "32,32", "--frame", "1", "--out", tmp_path / "m.png",
                      "--no-despeckle", "--keep-flagged"], capsys)
    assert result.code == 0, result.err
    mask = np.array(Image.open(tmp_path / "m.png"))
    assert mask.shape == (64, 64) and mask[32, 32] == 255 and mask[2, 2] == 0


def test_segment_every_frame_into_a_picture_is_refused_before_any_work(tmp_path, capsys):
    volume = _three_frame_volume(tmp_path / "v.mha")
    # The model path does not exist: had the despeckling started first, the error would name it.
    result = run_cli(["segment", volume, "--seed", "32,32", "--out", tmp_path / "m.png",
                      "--model", tmp_path / "missing.pt"], capsys)
    assert_refused(result, 2, "a picture holds one frame", ".mha")
    assert not (tmp_path / "m.png").exists()


def test_segment_refuses_a_lossy_mask_file_and_a_model_it_would_not_use(tmp_path, capsys):
    Image.fromarray(speckle((48, 64))).save(tmp_path / "a.png")
    result = run_cli(["segment", tmp_path / "a.png", "--seed", "32,24", "--out", tmp_path / "m.jpg",
                      "--no-despeckle"], capsys)
    assert_refused(result, 2, "m.jpg", "lossy", ".png")
    result = run_cli(["segment", tmp_path / "a.png", "--seed", "32,24", "--out", tmp_path / "m.png",
                      "--no-despeckle", "--model", tmp_path / "missing.pt"], capsys)
    assert_refused(result, 2, "--model", "--no-despeckle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.parametrize("option", ["--dynamic-range-db", "--fc"])
def test_simulate_refuses_an_infinite_option(option, tmp_path, capsys):
    result = run_cli(["simulate", "--size", "32", option, "inf", "--out", tmp_path / "s.png"], capsys)
    assert_refused(result, 2, option)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("args, words", [
    (["--fc", "7.5"], ["--fc", "in MHz? 7.5 MHz is 7.5e6 Hz"]),        # a frequency in MHz: terabytes, before
    (["--fc", "1e12"], ["--fc", "from 500000 to 1e+08"]),
    (["--seed", "-1"], ["--seed", "at least 0"]),
])
def test_simulate_refuses_a_frequency_or_seed_out_of_range_naming_the_option(args, words, tmp_path, capsys):
    result = run_cli(["simulate", "--size", "32", *args, "--out", tmp_path / "s.png"], capsys)
    assert_refused(result, 2, *words)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("second", ["--clean", "--reference"])
def test_simulate_refuses_two_outputs_in_one_file(second, tmp_path, capsys):
    (tmp_path / "n.png").write_bytes(b"keep")
    result = run_cli(["simulate", "--size", "32", "--out", tmp_path / "n.png", second, f"{tmp_path}/./n.png"], capsys)
    assert_refused(result, 2, f"--out and {second} name the same file")
    assert (tmp_path / "n.png").read_bytes() == b"keep"
