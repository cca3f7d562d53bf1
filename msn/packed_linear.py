"""`nn.Linear` that runs multi-row CPU inference on a oneDNN-prepacked copy of its weight.

A tree pass multiplies 4 to 70 rows by every weight. On CPU, MKL's GEMM leaves its few-row
path there and runs far below the memory roofline: on this project's Xeon (AVX-512, one
thread) the 135M model's MLP weights cost 25 ms for one row, 46 ms for 4 and 60 ms for 8, but
30, 30 and 34 ms on oneDNN with the weight reordered once into its blocked layout. One to three
rows stay on `F.linear`, which wins there (`benchmarks/RESULTS.md`, "The CPU path").

The packed copy is made on first use and remade when the weight changes (a new tensor or an
in-place update), so loading, merging an adapter or training between calls stay correct. It
costs a second copy of the weights in memory. Autograd, other devices and dtypes, and
`MSN_KERNELS=torch` take `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msn_kernels.dispatch import forced_reference

PACKED_MIN_ROWS = 4
_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: Tensor | None = None
        self._packed_key: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._use_packed(x):
            packed = self._packed_weight()
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self) -> dict:
        # The packed copy is an opaque oneDNN tensor that cannot be copied or pickled; a copy
        # of the module packs its own on first use.
        state = super().__getstate__()
        return {**state, "_packed": None, "_packed_key": None}

    def _use_packed(self, x: Tensor) -> bool:
        weight = self.weight
        return (
            _ONEDNN
            and x.numel() >= PACKED_MIN_ROWS * x.shape[-1]
            and x.device.type == "cpu"
            and weight.device.type == "cpu"
            and x.dtype == weight.dtype
            and x.dtype in _PACKED_DTYPES
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not forced_reference()
        )

    def _packed_weight(self) -> Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if self._packed_key != key:
            # The batch-size hint only tunes the layout; any row count runs on it.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
            self._packed_key = key
        return self._packed
