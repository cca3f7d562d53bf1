"""Fused Triton kernels for tree-based decoding, each beside its PyTorch reference.

This package knows nothing of models: it works on plain tensors.
"""
