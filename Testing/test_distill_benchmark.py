"""benchmarks/distill_refinement.py: the student is trained on exactly what the product returns for
it, and what it saves is a model the product loads without refining it again."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def teacher():
    from Speckle2SelfLib.engine.inference import Despeckler

    return Despeckler.from_file(None, "cpu", backend="fp32")


def _frame(size: int = 96) -> np.ndarray:
    from conftest import simulated_frames

    noisy, _clean = simulated_frames(n=1, size=size)
    return np.round(np.asarray(noisy[0]) * 200 + 20).astype(np.uint8)


@pytest.mark.parametrize("scale", [1.0, 0.75])
def test_the_loss_sees_what_denoise_returns_without_refinement(teacher, scale):
    """The working-scale resampling, the clamp and the grey-level fit of the bundled default's head,
    to the grey level."""
    import torch

    import distill_refinement as distill
    from Speckle2SelfLib.engine.inference import normalise_frame

    frame = _frame()
    x = np.empty(frame.shape, np.float32)
    normalise_frame(frame, x)
    with torch.no_grad():
        y = distill.student_output(teacher.module, torch.from_numpy(x)[None, None], scale,
                                   teacher.fits_grey_levels())[0, 0].numpy()
    lo, hi = int(frame.min()), int(frame.max())
    ours = np.rint(y.astype(np.float64) * (hi - lo) + lo)
    assert np.abs(ours - teacher.denoise(frame, refine="none", working_scale=scale)).max() <= 1
    assert np.array_equal(np.rint(distill.unit(frame, frame) * (hi - lo) + lo), frame)


def test_the_saved_student_loads_and_is_not_refined_again(teacher, tmp_path):
    import distill_refinement as distill
    from Speckle2SelfLib.engine.inference import Despeckler, normalise_frame
    from Speckle2SelfLib.engine.models import resolve_model_path

    frame = _frame(128)
    x = np.empty(frame.shape, np.float32)
    normalise_frame(frame, x)
    samples = [distill.Sample(x, distill.unit(teacher.denoise(frame), frame), 1.0)]
    args = distill.parse_args(["--minutes", "0.0001", "--crop", "64", "--batch", "2", "--out", str(tmp_path)])
    net, cfg = distill.student_net(resolve_model_path(None), args)
    result = distill.train(net.inference_module(), samples, args, teacher.fits_grey_levels())
    assert result["steps"] >= 1 and np.isfinite([result["loss_start"], result["loss_end"]]).all()
    path = distill.save_student(net, cfg, resolve_model_path(None), result, args, {"frames": 1})
    student = Despeckler.from_file(str(path), "cpu", backend="fp32")
    assert student.metadata["name"] == teacher.metadata["name"] + "-distilled"
    assert student.resolve_refine("auto") == "none" and "refine_sigma_px" not in student.metadata
    assert student.metadata["working_view_difference"] == teacher.metadata["working_view_difference"]
    out = student.denoise(frame)
    assert out.shape == frame.shape and out.dtype == frame.dtype and student.last_refine == "none"


def test_without_the_carotid_data_it_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import distill_refinement as distill

    monkeypatch.setenv("SPECKLE2SELF_SHARED", str(tmp_path))
    assert distill.main(["--minutes", "0.01"]) == 1
    assert "carotid data not found" in capsys.readouterr().err
