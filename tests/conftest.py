"""Test-wide setup: on a machine without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before
any test module imports msn_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
