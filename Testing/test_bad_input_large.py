"""Large inputs: bounded-memory inference (Speckle2SelfLib.engine.tiling) gives the plain forward
pass's result, and pictures too large to decode safely are refused. Issue #16 (a 4000x4000
PNG took 3.5 GB). The 4000x4000 measurement itself is in docs/reliability.md."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from test_bad_input_helpers import assert_refused, run_cli
from Speckle2SelfLib.engine import inference
from Speckle2SelfLib.engine.inference import Despeckler
from Speckle2SelfLib.engine.models import export_model, load_model, resolve_model_path
from Speckle2SelfLib.engine.network import Speckle2SelfNet
from Speckle2SelfLib.engine.tiling import UnsupportedNetwork, build_plan, run_plan, self_check


@pytest.fixture(scope="module")
def variants(untrained_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch")
    torch.manual_seed(3)
    path = folder / "resize-d3-norm.pt"
    export_model(Speckle2SelfNet(width=4, depth=3, upsample="resize", head="norm_relu"), path,
                 scales=(1.0, 0.5), interpolation="bilinear")
    leaky = folder / "resize-d2-leaky.pt"
    export_model(Speckle2SelfNet(width=4, depth=2, upsample="resize", head="norm_leaky"), leaky,
                 scales=(1.0, 0.5), interpolation="bilinear")
    found = {"transposed-d4": untrained_model, "resize-d3-norm_relu": path, "resize-d2-norm_leaky": leaky}
    try:
        found["bundled"] = resolve_model_path(None)
    except (FileNotFoundError, ValueError):
        pass
    return found


@pytest.mark.parametrize("arch", ["transposed-d4", "resize-d3-norm_relu", "resize-d2-norm_leaky", "bundled"])
def test_strip_execution_equals_the_plain_forward_pass(arch, variants):
    if arch not in variants:
        pytest.skip("no bundled model in this checkout")
    module = load_model(variants[arch]).module
    plan = build_plan(module)
    assert self_check(module, plan) < 1e-4
    x = torch.rand(1, 1, 101, 77, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = module(x)
    for budget in (1, 20_000):          # one strip per alignment step, and a few rows per strip
        got = run_plan(plan, x, strip_budget=budget)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) < 1e-4


def test_denoise_uses_bounded_memory_path_for_large_frames_with_the_same_result(untrained_model, monkeypatch):
    # fp32 pinned: on a CPU with native bf16, "auto" runs small frames in bf16 while the strip
    # path is always fp32, so the two would differ by bf16 rounding, not by the tiling.
    engine = Despeckler.from_file(untrained_model, device="cpu", backend="fp32")
    frame = np.random.default_rng(2).random((180, 230)).astype(np.float32)
    plain = engine.denoise(frame)
    calls = []
    original = engine._run_module_tiled
    monkeypatch.setattr(inference, "TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(engine, "_run_module_tiled", lambda x: calls.append(x.shape) or original(x))
    tiled = engine.denoise(frame)
    assert calls, "large frames take the strip path"
    assert np.abs(tiled - plain).max() < 1e-4


def test_unknown_layer_falls_back_to_the_plain_pass_with_a_warning(untrained_model):
    engine = Despeckler.from_file(untrained_model, device="cpu")

    class Odd(torch.nn.Module):
        def forward(self, x):
            return x

    engine.module = torch.jit.script(Odd())
    with pytest.raises(UnsupportedNetwork):
        build_plan(engine.module)
    with pytest.warns(UserWarning, match="untiled"):
        assert engine._strip_plan() is None


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def test_picture_too_large_to_decode_is_refused(tmp_path, untrained_model, capsys):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60000, 60000))
    result = run_cli(["denoise", path, tmp_path / "o.png", "--model", untrained_model], capsys)
    assert_refused(result, 2, "bomb.png", "too large")
    assert not (tmp_path / "o.png").exists()
