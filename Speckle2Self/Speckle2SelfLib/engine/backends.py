"""CPU inference backends: one network, several ways to run it.

``fp32``        the TorchScript model itself (always available; the reference).
``bf16``        torch bf16 autocast + channels_last. Fast only on CPUs with native bf16
                (Intel AMX / AVX512-BF16, Arm BF16); elsewhere torch emulates it, slower than fp32.
``openvino``    fp32 through OpenVINO (``pip install openvino``; optional extra ``openvino``).
``onnxruntime`` fp32 through ONNX Runtime (``pip install onnxruntime onnx``; extra ``onnxruntime``).
``auto``        the fastest installed path that agrees with the TorchScript model on a probe
                frame: OpenVINO, then ONNX Runtime, then bf16 where the CPU computes bf16
                natively, else fp32 (``python benchmarks/inference_speed.py`` ranks them; a
                runtime that is missing, fails to convert or disagrees is skipped with a
                warning). A runtime's first use converts the network (seconds; then cached on
                disk, and each process keeps its converted networks). On CUDA/MPS: the
                device's own path (CUDA: fp16/bf16 autocast).

The TorchScript file stays the source of truth. The runtimes' networks are derived from it at
load time: the eager network is rebuilt from the metadata, its weights loaded strictly and its
output compared with the TorchScript module's on a probe frame; that network (encoder +
decoder, without padding) is converted and cached in the user's cache folder (never inside the
installed package), keyed by the weights' checksum. A cached runtime network is compared with
the TorchScript module again at every load and rebuilt when it differs. Padding to the size
multiple, cropping and clamping stay in torch. Int8 is not offered: static int8 (ONNX Runtime
quantisation, run by ONNX Runtime or OpenVINO) changed outputs on carotid images by up to 0.3
(mean 0.01, on [0, 1]) for only 1.3-1.4x over the fp32 runtimes on an AVX2 CPU
(docs/methodology.md, what was tried).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .. import __version__
from .device import CPU_BATCH, TILE_ABOVE_BYTES, UNTILED_BYTES_PER_PIXEL_CHANNEL, cpu_has_native_bf16

BACKENDS = ("auto", "fp32", "bf16", "openvino", "onnxruntime")
#: Also the order in which "auto" tries them on the CPU: fastest first (OpenVINO ran the
#: bundled network about 1.3x faster than ONNX Runtime and 1.8x faster than torch fp32 on
#: 2 CPU cores, ``python benchmarks/inference_speed.py``).
RUNTIMES = ("openvino", "onnxruntime")
#: Largest |difference| to the TorchScript fp32 output on the probe frame that a derived
#: network may have (output range [0, 1]); a wrong weight or layer differs by far more.
PROBE_TOLERANCE = 2e-3
INSTALL_HINT = {"openvino": "pip install openvino", "onnxruntime": "pip install onnxruntime onnx"}

Runner = Callable    # (N, 1, h, w) float32 CPU tensor in [0, 1] -> the same, float32 on the CPU


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (package missing, or not a CPU device)."""


def runtime_installed(name: str) -> bool:
    """Whether an optional runtime's Python packages are importable (without importing them)."""
    needed = {"openvino": ["openvino"], "onnxruntime": ["onnxruntime", "onnx"]}[name]
    return all(importlib.util.find_spec(module) is not None for module in needed)


def available_backends(device: str = "cpu") -> List[str]:
    """The backends that can run on this machine and device (fp32 always)."""
    if device != "cpu":
        return ["auto", "fp32", "bf16"] if device.startswith("cuda") else ["auto", "fp32"]
    return ["auto", "fp32", "bf16"] + [name for name in RUNTIMES if runtime_installed(name)]


def auto_candidates(device: str) -> List[str]:
    """What ``backend="auto"`` tries on ``device``, in order (the last one always works)."""
    if device != "cpu":
        return ["auto"]
    installed = [name for name in RUNTIMES if runtime_installed(name)]
    return installed + ["bf16" if cpu_has_native_bf16() else "fp32"]


def resolve_backend(backend: Optional[str], device: str) -> str:
    """The concrete backend for ``backend`` on ``device`` ("auto": the first of
    :func:`auto_candidates`; :func:`select_backend` goes on down the list where one fails).

    On CUDA/MPS "auto" stays "auto": the device's own mixed-precision path.
    """
    name = (backend or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if device != "cpu":
        if name in RUNTIMES or (name == "bf16" and not device.startswith("cuda")):
            raise BackendUnavailable(f"backend {name!r} runs on the CPU only (device is {device}); "
                                     "use --device cpu, or backend auto or fp32")
        return name
    if name == "auto":
        return auto_candidates(device)[0]
    if name in RUNTIMES and not runtime_installed(name):
        raise BackendUnavailable(f"backend {name!r} is not installed; {INSTALL_HINT[name]} "
                                 "(in Slicer: slicer.util.pip_install(...)), or use fp32")
    return name


def select_backend(backend: Optional[str], device: str, loaded) -> Tuple[str, Optional[Runner]]:
    """(concrete backend name, runner or None) for a Despeckler; see :func:`build_runner`.

    ``auto`` on the CPU takes the first of :func:`auto_candidates` that sets up and agrees with
    the TorchScript model; an explicitly named backend that cannot is an error."""
    name = resolve_backend(backend, device)
    if device != "cpu":
        return name, None
    if (backend or "auto").lower() == "auto":
        *runtimes, fallback = auto_candidates(device)
        for runtime in runtimes:
            try:
                return runtime, shared_runner(runtime, loaded)
            except Exception as err:   # noqa: BLE001 - any failure: the next candidate runs
                warnings.warn(f"backend {runtime} skipped ({_first_line(err)}); trying the next one", stacklevel=3)
        name = fallback
    try:
        return name, shared_runner(name, loaded)
    except Exception as err:   # noqa: BLE001 - a runtime's own conversion errors, in one sentence
        raise RuntimeError(f"backend {name!r} could not be set up for this model: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


_SHARED_RUNNERS: dict = {}
_SHARED_LOCK = threading.Lock()


def shared_runner(backend: str, loaded) -> Optional[Runner]:
    """:func:`build_runner` once per process for each (backend, weights, thread count): a second
    Despeckler of the same model (the module's Apply, the live relay, each test) reuses the
    converted network instead of converting and probing it again. Calls into one runner are
    serialised (a runtime's inference request is not re-entrant)."""
    import torch

    if backend in ("fp32", "auto"):
        return None
    key = (backend, loaded.metadata.get("weights_sha256"), torch.get_num_threads(), os.environ.get("SPECKLE2SELF_CACHE_DIR"))
    with _SHARED_LOCK:
        runner = _SHARED_RUNNERS.get(key) if key[1] else None
        if runner is None:
            runner = _serialised(build_runner(backend, loaded))
            if key[1]:
                _SHARED_RUNNERS[key] = runner
        return runner


def _serialised(runner: Runner) -> Runner:
    lock = threading.Lock()

    def run(x):
        with lock:
            return runner(x)
    return run


def cpu_batch(backend: str, hw, width: int) -> int:
    """Frames per batch on the CPU: inference.CPU_BATCH; for the runtimes no more frames than
    run without strip tiling (tiled batches run through torch fp32, see Despeckler._needs_tiling)."""
    if backend not in RUNTIMES:
        return CPU_BATCH
    per_frame = int(hw[0]) * int(hw[1]) * int(width) * UNTILED_BYTES_PER_PIXEL_CHANNEL
    return int(max(1, min(CPU_BATCH, TILE_ABOVE_BYTES // max(1, per_frame))))


def cache_dir() -> Path:
    """Where derived runtime networks are kept: $SPECKLE2SELF_CACHE_DIR, else the user cache."""
    explicit = os.environ.get("SPECKLE2SELF_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return Path(base or Path.home() / ".cache") / "speckle2self" / "runtimes"


def build_runner(backend: str, loaded, threads: Optional[int] = None, cache: Optional[Path] = None
                 ) -> Optional[Runner]:
    """A function (N, 1, h, w) float32 CPU tensor in [0, 1] -> float32 CPU tensor, or None for
    plain fp32 (the caller's own path). Raises BackendUnavailable / RuntimeError on failure."""
    import torch

    if backend in ("fp32", "auto"):
        return None
    if backend == "bf16":
        return _bf16_runner(loaded.module)
    threads = int(threads or torch.get_num_threads())
    net = derived_network(loaded)
    make_core = _openvino_core if backend == "openvino" else _onnxruntime_core
    for fresh in (False, True):       # a cached network that fails or differs is rebuilt once
        try:
            runner = _padded(make_core(net, loaded.metadata, threads, cache, fresh), net.size_multiple)
            difference = _probe_difference(runner, loaded.module)
        except Exception:   # noqa: BLE001 - a damaged cache file; a fresh conversion raises
            if fresh:
                raise
            continue
        if difference <= PROBE_TOLERANCE:
            return runner
    raise RuntimeError(f"the {backend} network differs from the TorchScript model by {difference:.2g} "
                       f"on a test frame (allowed {PROBE_TOLERANCE}); use backend fp32")


# ----------------------------------------------------------------------------- torch paths

def _bf16_runner(module) -> Runner:
    import torch

    module.to(memory_format=torch.channels_last)     # same values; the fp32 paths accept it too

    def run(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x.contiguous(memory_format=torch.channels_last))
        return y.float().contiguous()
    return run


def derived_network(loaded):
    """The eager ``InferenceNet`` rebuilt from the metadata with the TorchScript module's
    weights (strict), checked against the TorchScript module on a probe."""
    import torch

    from .network import Speckle2SelfNet

    m = loaded.metadata
    try:
        net = Speckle2SelfNet(int(m["width"]), 1, m.get("upsample", "transposed"), False,
                              int(m.get("depth", 4)), m.get("head", "linear")).inference_module()
        net.load_state_dict(loaded.module.state_dict(), strict=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise RuntimeError(f"cannot rebuild this model's network for a runtime ({str(err).splitlines()[0]}); "
                           "use backend fp32") from err
    net.eval()
    if int(m.get("size_multiple", net.size_multiple)) != net.size_multiple:
        raise RuntimeError("the model pads to another size multiple than the rebuilt network; use backend fp32")

    def eager(x):
        with torch.inference_mode():
            return net(x)
    difference = _probe_difference(eager, loaded.module)
    if difference > 1e-5:
        raise RuntimeError(f"the rebuilt network differs from the TorchScript model ({difference:.2g}); "
                           "use backend fp32")
    return net


def _probe(size_multiple: int = 16):
    """A deterministic speckle-like test frame of an awkward size (padding and cropping run)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    h, w = 3 * size_multiple + 5, 4 * size_multiple + 3
    ramp = torch.linspace(0, 1, h * w).reshape(1, 1, h, w)
    return (0.6 * ramp + 0.4 * torch.rand(1, 1, h, w, generator=gen)).clamp(0, 1)


def _probe_difference(runner: Runner, module) -> float:
    import torch

    x = _probe(int(getattr(module, "size_multiple", 16) or 16))
    with torch.jit.optimized_execution(False), torch.inference_mode():
        reference = module(x)
    y = runner(x)
    if tuple(y.shape) != tuple(reference.shape):
        return float("inf")
    return float((y.float() - reference).abs().max())


def _padded(run_core: Callable, size_multiple: int) -> Runner:
    """Pad as the TorchScript module does, run the core (encoder + decoder), crop, clamp."""
    import torch

    from .network import pad_to_multiple

    def run(x):
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x.float(), size_multiple).contiguous()
        y = torch.from_numpy(run_core(padded.numpy()))
        return y[:, :, :h, :w].clamp(0.0, 1.0).contiguous()
    return run


def _core_module(net):
    """Encoder + decoder without the padding (what the runtimes run; sizes are multiples)."""
    import torch

    return torch.nn.Sequential(net.encoder, net.decoder).eval()


def _example(net):
    import torch

    return torch.rand(1, 1, 2 * net.size_multiple, 2 * net.size_multiple)


def _traced_core(net):
    """The core traced once (no shape-dependent branches in it; the probe check follows)."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(_core_module(net), _example(net), check_trace=False)


def _cache_stem(metadata, backend: str, version: str) -> str:
    return f"{metadata['weights_sha256'][:24]}-{backend}{version}-lib{__version__}"


def _writable_cache(cache: Optional[Path]) -> Optional[Path]:
    folder = Path(cache) if cache is not None else cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        return folder
    except OSError:
        return None          # runs without a cache (conversion at every load)


# ----------------------------------------------------------------------------- OpenVINO

def _openvino_core(net, metadata, threads: int, cache: Optional[Path], fresh: bool = False):
    import openvino as ov

    folder = _writable_cache(cache)
    xml = folder / f"{_cache_stem(metadata, 'openvino', ov.__version__.split('-')[0])}.xml" if folder else None
    core = ov.Core()
    if xml is not None and xml.is_file() and not fresh:
        model = core.read_model(str(xml))       # a damaged file raises: build_runner converts again
    else:
        model = ov.convert_model(_traced_core(net), example_input=_example(net),
                                 input=[ov.PartialShape([-1, 1, -1, -1])])
        if xml is not None:
            part = xml.with_name(xml.stem + f".{os.getpid()}.part.xml")
            ov.save_model(model, str(part), compress_to_fp16=False)
            part.with_suffix(".bin").replace(xml.with_suffix(".bin"))
            part.replace(xml)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(x):
        return request.infer({0: x})[output].copy()
    return run


# ----------------------------------------------------------------------------- ONNX Runtime

def _export_onnx(net, path: Optional[Path]) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_core_module(net), (_example(net),), buffer, input_names=["x"], output_names=["y"],
                          dynamo=False, opset_version=17,
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}})
    data = buffer.getvalue()
    if path is not None:
        part = path.with_name(path.name + f".{os.getpid()}.part")
        part.write_bytes(data)
        part.replace(path)
    return data


def _onnxruntime_core(net, metadata, threads: int, cache: Optional[Path], fresh: bool = False):
    import onnxruntime as ort

    folder = _writable_cache(cache)
    path = folder / f"{_cache_stem(metadata, 'onnx', '17')}.onnx" if folder else None
    cached = path is not None and path.is_file() and not fresh
    data = path.read_bytes() if cached else _export_onnx(net, path)   # a damaged file raises below
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")   # no busy-wait between calls
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def run(x):
        return session.run(None, {"x": x})[0]
    return run
