"""`x @ weight.T + bias` for the few rows of a decode step, on an x86 CPU core (AVX2 + FMA).

A decode step multiplies 1 to 16 rows by every weight, so on a CPU it is bound by reading the
weights from memory, and the library GEMMs are not: on this project's 2-core AVX2 server, MKL
costs 1.7x for 2 rows what it costs for 1, and oneDNN's prepacked path 1.2x, where the memory
traffic is the same. `csrc/few_row_linear.cpp` reads each weight row once for up to 8 rows and
prefetches ahead, so a step of 2 to 4 tokens costs about what 1 costs (`benchmarks/RESULTS.md`).

Its results are batch-invariant: each output element is accumulated in one fixed order, so a
row's result is bit-identical whatever the number of rows beside it (a tree step's logits at
the root equal a one-token step's).

The C++ source is compiled on first use with the compiler that `torch.utils.cpp_extension`
finds (about a minute, cached under `$TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`); `scripts/install.sh` builds it up front. Where that is not
possible (no compiler, or a CPU without AVX2) `few_row_linear_available()` says so once, with
the reason, and callers fall back to `F.linear`. `MSN_FEW_ROW_LINEAR=0` turns it off (as does
`MSN_KERNELS=torch`), to compare against the fallback.
"""

from __future__ import annotations

import os
import platform
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from msn_kernels.dispatch import forced_reference

FEW_ROWS_MAX = 16  # beyond this (a prefill), oneDNN or MKL GEMMs are the faster choice
SOURCE = Path(__file__).parent / "csrc" / "few_row_linear.cpp"
EXTENSION_NAME = "msn_few_row_linear"

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "op" once built and loaded, or "error": the reason it cannot


def cpu_supported() -> bool:
    """Whether this CPU runs the kernel: x86-64 with AVX2 and FMA (ATen's AVX2 level or up)."""
    machine = platform.machine().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    return machine in ("x86_64", "amd64") and capability in ("AVX2", "AVX512")


def load_few_row_linear(verbose: bool = False):
    """Build (once per source version) and load the kernel; returns the torch op.

    Raises RuntimeError naming the cause and the fix when it cannot be built or run here.
    """
    op = _loaded.get("op")  # once loaded, every linear call takes this path: no lock
    if op is not None:
        return op
    with _lock:
        if "op" in _loaded:
            return _loaded["op"]
        if "error" in _loaded:
            raise RuntimeError(_loaded["error"])
        try:
            _loaded["op"] = _build(verbose)
        except Exception as error:  # the compiler's own failure, kept as the reason
            reason = str(error).strip().splitlines()[0][:300]
            _loaded["error"] = (
                f"msn's CPU few-row linear kernel is unavailable ({reason}); decoding falls back "
                "to F.linear, with slower tree steps. To build it, install a C++ compiler with "
                "OpenMP (`apt-get install g++`) and ninja (`pip install ninja`); to see the "
                "build log: python -c 'from msn_kernels.few_row_linear import "
                "load_few_row_linear; load_few_row_linear(verbose=True)'"
            )
            raise RuntimeError(_loaded["error"]) from error
        return _loaded["op"]


def _build(verbose: bool):
    if not cpu_supported():
        raise RuntimeError(
            f"this CPU ({platform.machine()}, ATen level "
            f"{torch.backends.cpu.get_cpu_capability()}) has no AVX2/FMA"
        )
    from torch.utils.cpp_extension import load

    load(
        name=EXTENSION_NAME,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.msn_cpu.few_row_linear.default  # the overload itself: a cheaper call


def few_row_linear_available() -> bool:
    """Whether the kernel can run here; the first failure is reported once as a warning."""
    if "op" in _loaded:
        return True
    if "error" in _loaded:
        return False
    try:
        load_few_row_linear()
    except RuntimeError as error:
        warnings.warn(str(error), RuntimeWarning, stacklevel=2)
        return False
    return True


def use_few_row_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether a linear call should take the kernel: a few float32 CPU rows, no autograd."""
    # Called for every linear of every step: the cheapest tests come first.
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and 1 <= x.numel() // max(1, x.shape[-1]) <= FEW_ROWS_MAX
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not forced_reference()
        and os.environ.get("MSN_FEW_ROW_LINEAR", "1").strip() != "0"
        and few_row_linear_available()
    )


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for float32 CPU tensors through the kernel; x is [..., K]."""
    return load_few_row_linear()(x, weight, bias)  # (..., N); the op makes inputs contiguous


def few_row_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)
