"""Spec-Bench interface: drop msn's decoder into Spec-Bench's evaluation scripts.

Spec-Bench calls `forward_func(inputs, model, tokenizer, max_new_tokens)` and expects
`(output_ids, new_tokens, steps, accept_length_list)`.
"""

from __future__ import annotations

import torch

from msn.decoding import generate


def noise_forward(input_ids, model, tokenizer, max_new_tokens: int, **options):
    """TR-Jacobi decoding (paper mode unless `options` say otherwise) in Spec-Bench's form.

    `input_ids`: a [1, L] tensor, a list of ints, or a tokenizer's `BatchEncoding`. Decoding
    stops at the tokenizer's EOS as well as the checkpoint's own EOS ids.
    """
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:
        input_ids = input_ids["input_ids"]
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else model.device
    eos = set(model.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    options.setdefault("method", "tr-jacobi")
    result = generate(model, input_ids, max_new_tokens, eos_token_id=sorted(eos), **options)
    return result.output_ids.to(device), result.new_tokens, result.steps, result.accept_lengths
