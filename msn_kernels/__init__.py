"""Fused Triton kernels for tree-based decoding, each beside its PyTorch reference.

This package knows nothing of models: it works on plain tensors. `msn_kernels.dispatch` picks
Triton (CUDA, or CPU under TRITON_INTERPRET=1), or PyTorch: tree attention's SDPA path on
CPU, the reference otherwise or under MSN_KERNELS=torch.
"""

from msn_kernels.compact_kv import compact_kv, compact_kv_reference
from msn_kernels.greedy_verify import VerifyResult, greedy_verify, greedy_verify_reference
from msn_kernels.tree_attention import tree_attention, tree_attention_reference

__all__ = [
    "VerifyResult",
    "compact_kv",
    "compact_kv_reference",
    "greedy_verify",
    "greedy_verify_reference",
    "tree_attention",
    "tree_attention_reference",
]
