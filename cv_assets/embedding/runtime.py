"""Which device, backend and number format run the CLIP model.

`choose_runtime(settings, capabilities)` is a pure function of the configuration and of
what the machine offers (`Capabilities`, from `probe_capabilities()`), so every rule
can be tested with a made-up machine. The rules for `auto`:

- device: CUDA when torch sees a GPU, else CPU;
- on CUDA: torch, fp16 (tensor cores; vectors within cosine 0.9999 of fp32);
- on a CPU: OpenVINO when it is installed (faster than torch at the same precision:
  its graph compiler fuses attention and the MLPs), else torch; bf16 when the
  processor has bf16 instructions (AVX512_BF16 / AMX: about twice the fp32 speed),
  else fp32 (without them bf16 is emulated, several times slower than fp32).

The chosen precision is what runs: OpenVINO silently computes in f32 when asked for
bf16/fp16 on a CPU that lacks them, so such a request resolves to fp32 here (and the
compiled model's own report, `openvino_backend.effective_precision`, is checked after
compiling). torch does what it is told: bf16 without bf16 instructions is emulated.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
from dataclasses import dataclass
from functools import lru_cache

from cv_assets.embedding.base import EmbedderConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("torch", "openvino")
# /proc/cpuinfo flags (x86) and Features (arm64) that mean native bf16 / fp16 arithmetic.
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
FP16_FLAGS = {"avx512_fp16", "amx_fp16"}


@dataclass(frozen=True)
class Capabilities:
    """What this machine can run: a CUDA device, native CPU bf16/fp16, an importable OpenVINO."""

    cuda: bool = False
    cpu_bf16: bool = False
    cpu_fp16: bool = False
    openvino: bool = False


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" | "cuda"
    backend: str  # "torch" | "openvino"
    precision: str  # "fp32" | "bf16" | "fp16"


def cpu_flags() -> set[str]:
    """The processor's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def probe_capabilities() -> Capabilities:
    """This machine's capabilities (cached: they do not change while the process runs)."""
    import torch

    flags = cpu_flags()
    return Capabilities(
        cuda=torch.cuda.is_available(),
        cpu_bf16=bool(flags & BF16_FLAGS) or (platform.system() == "Darwin" and platform.machine() == "arm64"),
        cpu_fp16=bool(flags & FP16_FLAGS),
        openvino=importlib.util.find_spec("openvino") is not None,
    )


def choose_runtime(device: str, backend: str, precision: str, capabilities: Capabilities) -> Runtime:
    """Resolve the `auto`s of `embedder.device/backend/precision` for `capabilities`;
    a combination the machine cannot run raises `EmbedderConfigError` naming the key."""
    if device == "auto":
        device = "cuda" if capabilities.cuda else "cpu"
    elif device == "cuda" and not capabilities.cuda:
        raise EmbedderConfigError("embedder.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise EmbedderConfigError(f"embedder.device {device!r} is not one of auto, cpu, cuda")
    if backend not in ("auto", *BACKENDS):
        raise EmbedderConfigError(f"embedder.backend {backend!r} is not one of auto, torch, openvino")
    if precision not in ("auto", *PRECISIONS):
        raise EmbedderConfigError(f"embedder.precision {precision!r} is not one of auto, fp32, bf16, fp16")

    if device == "cuda":
        if backend == "openvino":
            raise EmbedderConfigError(
                "embedder.backend 'openvino' runs on the CPU here; with device 'cuda' use backend 'torch' or 'auto'")
        return Runtime("cuda", "torch", "fp16" if precision == "auto" else precision)

    if backend == "openvino" and not capabilities.openvino:
        raise EmbedderConfigError(
            "embedder.backend is 'openvino' but the openvino package is not installed "
            "(pip install openvino, or use backend 'auto' or 'torch')")
    if backend == "auto":
        backend = "openvino" if capabilities.openvino else "torch"
    if precision == "auto":
        precision = "bf16" if capabilities.cpu_bf16 else "fp32"
    native = {"fp32": True, "bf16": capabilities.cpu_bf16, "fp16": capabilities.cpu_fp16}
    if backend == "openvino" and not native[precision]:
        # OpenVINO's CPU plugin computes in f32 when the processor lacks the format: say so
        # now (and key the cache by it), not only after the model is compiled.
        log.warning("embedder.precision %s: this CPU has no %s instructions, so OpenVINO runs fp32",
                    precision, precision)
        precision = "fp32"
    return Runtime("cpu", backend, precision)


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
