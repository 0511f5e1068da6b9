"""Hardware facts: which device runs, what the CPU computes natively, how much a batch may hold.

The engine's other modules (inference, backends, training, adaptation) read these; this module
imports none of them, so the engine has no import circle through them.
"""

from __future__ import annotations

CPU_BATCH = 4          # CPU throughput barely changes above this; small batches keep Cancel responsive
#: Frames whose plain forward pass would take more than this run layer by layer in strips
#: (bounded memory, same result). The estimate: bytes per pixel and network channel of the
#: plain pass, measured on CPU (about 140 B/px at width 16).
TILE_ABOVE_BYTES = 384 * 2 ** 20
UNTILED_BYTES_PER_PIXEL_CHANNEL = 9


def pick_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu. Explicit names are checked for availability."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "mps") and not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.partition(":")[2]
        if not count:
            raise DeviceUnavailable(f"device {device!r} requested but this PyTorch sees no CUDA GPU "
                                    f"({_torch_build()}); use device cpu or auto")
        if index and not (index.isdigit() and int(index) < count):
            raise DeviceUnavailable(f"device {device!r} requested but this machine has {count} CUDA GPU(s) "
                                    f"(cuda:0..cuda:{count - 1}); use one of them, cuda or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailable("device 'mps' requested but Apple's Metal GPU is not available here (it needs "
                                "an Apple-silicon Mac and a PyTorch built with MPS); use device cpu or auto")
    return device


class DeviceUnavailable(ValueError):
    """The requested device does not exist here: a bad option (CLI exit 2), not a failed run."""


def _torch_build() -> str:
    import torch

    version = getattr(torch, "__version__", "?")
    return f"PyTorch {version} is a CPU-only build" if "+cpu" in version or not torch.version.cuda \
        else f"PyTorch {version} with CUDA {torch.version.cuda}, but no GPU or driver found"


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (Intel AMX / AVX512-BF16, Arm BF16).

    Elsewhere (e.g. AVX2-only CPUs) bf16 autocast is emulated and slower than fp32.
    """
    import torch

    capability = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(next((line for line in fh if line.startswith(("flags", "Features"))), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
