"""Every numeric option is checked when it is parsed: NaN, infinities, zero, negative and
out-of-range values are refused with one line naming the option, exit code 2, before any file
is read or written. Issue #16."""

from __future__ import annotations

import pytest
from PIL import Image

from test_bad_input_helpers import assert_refused, run_cli, snapshot, speckle


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.fromarray(speckle((48, 64))).save(path)
    return path


DENOISE_CASES = [
    (["--gamma", "nan"], "--gamma"), (["--gamma", "inf"], "--gamma"), (["--gamma", "0"], "--gamma"),
    (["--gamma", "-1.5"], "--gamma"), (["--blend", "-0.1"], "--blend"), (["--blend", "1.5"], "--blend"),
    (["--blend", "nan"], "--blend"), (["--batch", "0"], "--batch"), (["--batch", "-2"], "--batch"),
    (["--batch", "two"], "--batch"), (["--threads", "0"], "--threads"), (["--working-scale", "nan"], "--working-scale"),
    (["--working-scale", "9"], "--working-scale"), (["--device", "tpu"], "unknown device"),
    (["--device", "mps"], "'mps' requested"), (["--device", "cuda:99"], "'cuda:99' requested"),   # absent here
]


@pytest.mark.parametrize("options, needle", DENOISE_CASES, ids=[" ".join(c[0]) for c in DENOISE_CASES])
def test_denoise_option_is_refused(options, needle, picture, tmp_path, untrained_model, capsys):
    before = snapshot(tmp_path)
    result = run_cli(["denoise", picture, tmp_path / "out.png", "--model", untrained_model, *options], capsys)
    assert_refused(result, 2, needle)
    assert snapshot(tmp_path) == before, "nothing written"


TRAIN_CASES = [
    (["--steps", "0"], "untrained"), (["--steps", "-5"], "--steps"), (["--minutes", "0"], "--minutes"),
    (["--minutes", "-1"], "--minutes"), (["--minutes", "nan"], "--minutes"), (["--epochs", "inf"], "--epochs"),
    (["--crop", "0"], "--crop"), (["--crop", "100"], "multiple of 16"), (["--batch", "0"], "--batch"),
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--width", "0"], "--width"), (["--depth", "1"], "--depth"),
    (["--depth", "9"], "--depth"), (["--scales", "0,1"], "--scales"), (["--scales", "a,b"], "--scales"),
    (["--augment-prob", "2"], "--augment-prob"), (["--working-scale", "0"], "--working-scale"),
    (["--checkpoint-every", "0"], "--checkpoint-every"), (["--preview-every", "-1"], "--preview-every"),
    (["--rotate-degrees", "inf"], "--rotate-degrees"),
    (["--consistency", "none", "--consistency-weight", "0.5"], "--consistency-weight"),
    (["--consistency", "none", "--edge-sigma", "0.01"], "--edge-sigma"),
    (["--edge-power", "0.5"], "give --edge-sigma"), (["--device", "mps"], "'mps' requested"),
    (["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("options, needle", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_option_is_refused(options, needle, picture, tmp_path, capsys):
    before = snapshot(tmp_path)
    stop = [] if any(o in options for o in ("--steps", "--minutes", "--epochs")) else ["--steps", "1"]
    result = run_cli(["train", picture.parent, "--out", tmp_path / "m.pt", *stop, *options], capsys)
    assert_refused(result, 2, needle)
    assert snapshot(tmp_path) == before, "nothing written"


def test_train_without_a_stopping_rule_is_refused(picture, tmp_path, capsys):
    result = run_cli(["train", picture.parent, "--out", tmp_path / "m.pt"], capsys)
    assert_refused(result, 2, "--minutes, --epochs or --steps")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.ckpt").exists()


def test_train_that_cannot_fit_in_memory_is_refused_with_settings_that_fit(picture, tmp_path, capsys):
    """The 24 GB OOM of `train --crop 2048`: refused before the first step, with the estimate."""
    result = run_cli(["train", picture.parent, "--out", tmp_path / "m.pt", "--steps", "5", "--crop", "4096",
                      "--batch", "4096", "--device", "cpu"], capsys)
    line = assert_refused(result, 2, "would need about", "free", "try --crop")
    assert "GB" in line
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.ckpt").exists()


def test_debug_shows_the_traceback_and_keeps_the_exit_code(picture, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    plain = run_cli(["denoise", bad, tmp_path / "o.png"], capsys)
    debug = run_cli(["--debug", "denoise", bad, tmp_path / "o.png"], capsys)
    after = run_cli(["denoise", bad, tmp_path / "o.png", "--debug"], capsys)
    assert plain.code == debug.code == after.code == 2
    assert "Traceback" not in plain.err and "Traceback" in debug.err and "Traceback" in after.err
