"""`nn.Linear` with two CPU inference paths for decode and tree steps.

A tree pass multiplies 1 to 70 rows by every weight, and CPU GEMM libraries run far below the
memory roofline at few rows (`benchmarks/RESULTS.md`, "The CPU path"):
- up to `FEW_ROWS_MAX` float32 rows take `msn_kernels.few_row_linear`, which reads each weight
  row once for all of them (and gives every row the same bits whatever the row count);
- where that kernel cannot run (no compiler, no AVX2, bfloat16), 4 rows or more run on a copy
  of the weight that oneDNN reordered once into its blocked layout: on an AVX-512 Xeon (one
  thread) the 135M model's MLP weights cost 25 ms for one row, 46 ms for 4 and 60 ms for 8 on
  MKL, but 30, 30 and 34 ms there; 1 to 3 rows stay on `F.linear`, which wins there.

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
from msn_kernels.few_row_linear import few_row_linear, use_few_row_linear

PACKED_MIN_ROWS = 4
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN packs bfloat16 only on CPUs with native bf16 conversions (AVX512-BW/VL/DQ or
# AVX-NE-CONVERT); an AVX2-only CPU raises, so bfloat16 takes F.linear there.
_BF16_PACKS = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_PACKED_DTYPES = (torch.float32, torch.bfloat16) if _BF16_PACKS else (torch.float32,)


class PackedLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: Tensor | None = None
        self._packed_key: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight  # a module attribute lookup costs a microsecond or two
        if use_few_row_linear(x, weight):
            return few_row_linear(x, weight, self.bias)
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
