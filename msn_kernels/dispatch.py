"""Pick the implementation of a kernel call: Triton, Triton through its interpreter, or PyTorch.

- `MSN_KERNELS=torch` forces the PyTorch reference everywhere.
- CUDA tensors run the Triton kernel.
- CPU tensors run the Triton kernel through the interpreter when `TRITON_INTERPRET=1`, and
  otherwise PyTorch: the reference, or where a kernel has one, its CPU path (tree attention's
  single `scaled_dot_product_attention` call).

The environment is read at call time. Triton itself decides at decoration time (when
`msn_kernels` is imported) whether a kernel is compiled or interpreted, so a CPU call only takes
the Triton path when the kernel object really is an interpreted one.
"""

import os

import torch
from triton.runtime.interpreter import InterpretedFunction


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


def forced_reference() -> bool:
    """True when `MSN_KERNELS=torch` asks for the PyTorch reference everywhere."""
    return os.environ.get("MSN_KERNELS", "").strip().lower() == "torch"


def use_triton(kernel: object, device: torch.device) -> bool:
    """Whether a call with tensors on `device` should launch `kernel` (a Triton kernel object)."""
    if forced_reference():
        return False
    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type == "cuda":
        return not interpreted or _env_flag("TRITON_INTERPRET")
    return device.type == "cpu" and interpreted and _env_flag("TRITON_INTERPRET")
