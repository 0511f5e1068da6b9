"""CPU inference backends (Speckle2SelfLib.engine.backends): choice, agreement with fp32, cache, CLI.

The runtimes (OpenVINO, ONNX Runtime) are optional packages: their tests skip when they are
not installed. Agreement is checked on the network's float output and on uint8 results.
"""

from __future__ import annotations

import numpy as np
import pytest

from Speckle2SelfLib.engine import backends
from Speckle2SelfLib.engine.inference import Despeckler
from Speckle2SelfLib.engine.models import load_model

RUNTIMES = [pytest.param(name, marks=pytest.mark.skipif(
    not backends.runtime_installed(name), reason=f"{name} is not installed ({backends.INSTALL_HINT[name]})"))
    for name in backends.RUNTIMES]


def speckle(n=3, h=45, w=70, seed=0):
    """uint8 frames of an awkward size (padding and cropping run), with structure and speckle."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, w)[None, None, :] + np.linspace(0, 60, h)[None, :, None]
    return np.clip(ramp * rng.rayleigh(0.8, (n, h, w)), 0, 255).astype(np.uint8)


def network_output(engine, frames):
    import torch
    x = torch.from_numpy(frames.astype(np.float32)[:, None] / 255.0)
    return engine._run_module(x).numpy()


def test_auto_without_runtimes_is_native_bf16_else_fp32_and_names_are_checked(monkeypatch):
    monkeypatch.setattr(backends, "runtime_installed", lambda name: False)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    assert backends.resolve_backend("auto", "cpu") == "fp32"
    assert backends.resolve_backend(None, "cpu") == "fp32"
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    assert backends.resolve_backend("AUTO", "cpu") == "bf16"
    assert backends.resolve_backend("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="unknown backend 'int4'"):
        backends.resolve_backend("int4", "cpu")
    with pytest.raises(backends.BackendUnavailable, match="CPU only"):
        backends.resolve_backend("openvino", "cuda")
    assert backends.resolve_backend("auto", "cuda") == "auto"        # the device's own autocast path


def test_a_missing_runtime_is_refused_with_the_install_command(monkeypatch, untrained_model):
    monkeypatch.setattr(backends, "runtime_installed", lambda name: False)
    assert backends.available_backends("cpu") == ["auto", "fp32", "bf16"]
    with pytest.raises(backends.BackendUnavailable, match="pip install onnxruntime onnx"):
        Despeckler.from_file(untrained_model, "cpu", backend="onnxruntime")


def test_fp32_is_the_default_without_runtimes_and_gives_the_torchscript_result(untrained_model, monkeypatch):
    monkeypatch.setattr(backends, "runtime_installed", lambda name: False)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    engine = Despeckler.from_file(untrained_model, "cpu")
    assert engine.backend == "fp32" and engine._runner is None
    frames = speckle()
    import torch
    with torch.inference_mode():
        direct = engine.module(torch.from_numpy(frames.astype(np.float32)[:, None] / 255.0)).numpy()
    np.testing.assert_array_equal(network_output(engine, frames), direct)


def test_bf16_runs_in_bf16_and_stays_close_to_fp32(untrained_model):
    frames = speckle()
    reference = network_output(Despeckler.from_file(untrained_model, "cpu", backend="fp32"), frames)
    engine = Despeckler.from_file(untrained_model, "cpu", backend="bf16")
    out = network_output(engine, frames)
    assert out.dtype == np.float32 and out.shape == reference.shape
    difference = np.abs(out - reference)
    assert difference.max() > 0                 # really computed in bf16 ...
    assert difference.mean() < 0.01             # ... and the same picture (untrained net: no max bound)


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime_engine(request, untrained_model, tmp_path_factory):
    """(runtime name, Despeckler on it, its cache folder): converted once per runtime."""
    folder = tmp_path_factory.mktemp("runtime-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECKLE2SELF_CACHE_DIR", str(folder))
        yield request.param, Despeckler.from_file(untrained_model, "cpu", backend=request.param), folder


def test_runtime_matches_fp32_at_any_size_and_batch(runtime_engine, untrained_model):
    runtime, engine, _cache = runtime_engine
    assert engine.backend == runtime and engine._runner is not None
    fp32 = Despeckler.from_file(untrained_model, "cpu", backend="fp32")
    for frames in (speckle(), speckle(n=1, h=130, w=97, seed=1)):     # one converted network, dynamic shapes
        assert np.abs(network_output(engine, frames) - network_output(fp32, frames)).max() < backends.PROBE_TOLERANCE
        result, reference = engine.denoise(frames, working_scale=None), fp32.denoise(frames, working_scale=None)
        assert result.dtype == np.uint8 and result.shape == frames.shape
        assert np.abs(result.astype(int) - reference).max() <= 1


def test_the_converted_network_is_cached_by_weights_and_reused(runtime_engine, untrained_model):
    runtime, _engine, cache = runtime_engine
    sha = load_model(untrained_model).metadata["weights_sha256"][:24]
    files = sorted(cache.iterdir())
    assert files and all(p.name.startswith(sha) for p in files) and not any(".part" in p.name for p in files)
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    backends._SHARED_RUNNERS.clear()              # a new process: the cached file is what it has
    Despeckler.from_file(untrained_model, "cpu", backend=runtime)        # read back, checked, not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


def _tamper(path):
    """A cached network with other weights (ONNX: one convolution negated) or a damaged file."""
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
        weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
        onnx.save(model, str(path))
    elif path.suffix == ".bin":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_tampered_or_damaged_cache_is_detected_and_rebuilt(runtime_engine, untrained_model, tmp_path, monkeypatch):
    import shutil

    runtime, _engine, cache = runtime_engine
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    for path in copy.iterdir():
        _tamper(path)
    tampered = {p.name: p.read_bytes() for p in copy.iterdir()}
    monkeypatch.setenv("SPECKLE2SELF_CACHE_DIR", str(copy))
    engine = Despeckler.from_file(untrained_model, "cpu", backend=runtime)
    frames = speckle(seed=3)
    reference = network_output(Despeckler.from_file(untrained_model, "cpu", backend="fp32"), frames)
    assert np.abs(network_output(engine, frames) - reference).max() < backends.PROBE_TOLERANCE
    rewritten = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert rewritten.keys() == tampered.keys() and all(rewritten[n] != tampered[n] for n in tampered
                                                       if n.endswith((".onnx", ".bin")))


def test_the_rebuilt_network_is_refused_when_it_differs_from_the_torchscript_model(untrained_model):
    loaded = load_model(untrained_model)
    net = backends.derived_network(loaded)
    assert net.size_multiple == loaded.metadata["size_multiple"]
    loaded.metadata = dict(loaded.metadata, head="norm_relu")          # metadata of another network
    with pytest.raises(RuntimeError, match="cannot rebuild|differs"):
        backends.derived_network(loaded)


def test_cli_denoise_takes_a_backend(untrained_model, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from Speckle2SelfLib.cli import main

    Image.fromarray(speckle(n=1)[0]).save(tmp_path / "in.png")
    assert main(["denoise", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--model", str(untrained_model),
                 "--device", "cpu", "--backend", "fp32"]) == 0
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (45, 70)
    monkeypatch.setattr(backends, "runtime_installed", lambda name: False)
    assert main(["denoise", str(tmp_path / "in.png"), str(tmp_path / "out2.png"), "--model", str(untrained_model),
                 "--backend", "openvino"]) != 0
    assert "pip install openvino" in capsys.readouterr().err
    assert not (tmp_path / "out2.png").exists()


OPENVINO = pytest.mark.skipif(not backends.runtime_installed("openvino"), reason="openvino is not installed "
                              f"({backends.INSTALL_HINT['openvino']})")


@OPENVINO
def test_auto_runs_the_fastest_installed_runtime_and_the_picture_stays_within_2_grey_levels(tmp_path, monkeypatch):
    """The bundled default model, its default (refined) output: auto takes OpenVINO where it is
    installed, and a user sees the fp32 picture within 2 grey levels."""
    monkeypatch.setenv("SPECKLE2SELF_CACHE_DIR", str(tmp_path))
    engine = Despeckler.from_file(None, "cpu")
    assert engine.backend == "openvino" and engine._runner is not None
    frames = speckle(n=2, h=96, w=130, seed=5)
    fp32 = Despeckler.from_file(None, "cpu", backend="fp32").denoise(frames)
    assert np.abs(engine.denoise(frames).astype(int) - fp32).max() <= 2


def test_auto_goes_on_past_a_runtime_that_fails(untrained_model, monkeypatch, tmp_path):
    monkeypatch.setenv("SPECKLE2SELF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backends, "runtime_installed", lambda name: True)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    tried = []

    def failing(name, loaded, threads=None, cache=None):
        tried.append(name)
        if name in backends.RUNTIMES:
            raise RuntimeError(f"{name} conversion failed")
        return None

    monkeypatch.setattr(backends, "build_runner", failing)
    with pytest.warns(UserWarning, match="backend openvino skipped.*conversion failed"):
        engine = Despeckler.from_file(untrained_model, "cpu")
    assert tried == ["openvino", "onnxruntime"] and engine.backend == "fp32" and engine._runner is None
    with pytest.raises(RuntimeError, match="backend 'onnxruntime' could not be set up.*conversion failed"):
        Despeckler.from_file(untrained_model, "cpu", backend="onnxruntime")   # named: an error, no fallback


@OPENVINO
def test_a_second_engine_of_the_same_model_reuses_the_converted_network(untrained_model, monkeypatch, tmp_path):
    monkeypatch.setenv("SPECKLE2SELF_CACHE_DIR", str(tmp_path))
    built = []
    build = backends.build_runner
    monkeypatch.setattr(backends, "build_runner", lambda *a, **k: built.append(a[0]) or build(*a, **k))
    first = Despeckler.from_file(untrained_model, "cpu", backend="openvino")
    second = Despeckler.from_file(untrained_model, "cpu", backend="openvino")
    assert built == ["openvino"] and first._runner is second._runner
    frames = speckle(seed=4)
    np.testing.assert_array_equal(first.denoise(frames), second.denoise(frames))
