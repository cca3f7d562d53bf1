"""Spec-Bench interface: drop msn's decoder into Spec-Bench's evaluation scripts.

Spec-Bench calls `forward_func(inputs, model, tokenizer, max_new_tokens)` and expects
`(output_ids, new_tokens, steps, accept_length_list)`.
"""

from __future__ import annotations

import torch

from msn.decoding import generate
from msn.interop import resolve_model


def noise_forward(
    input_ids,
    model,
    tokenizer,
    max_new_tokens: int,
    temperature: float = 0.0,
    do_sample: bool | None = None,
    **options,
):
    """TR-Jacobi decoding (paper mode unless `options` say otherwise) in Spec-Bench's form.

    `input_ids`: a [1, L] tensor, a list of ints, or a tokenizer's `BatchEncoding`. Decoding
    stops at the tokenizer's EOS as well as the checkpoint's own EOS ids. `temperature` is the
    one Spec-Bench's scripts pass: 0 decodes greedily, above 0 samples losslessly at that
    temperature (`do_sample` defaults to `temperature > 0`; Spec-Bench seeds each choice with
    `torch.manual_seed`, which fixes the draws when `options` has no `seed`).
    """
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:
        input_ids = input_ids["input_ids"]
    model = resolve_model(model)  # a transformers Llama model reads its config through msn's
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else model.device
    eos = set(model.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    options.setdefault("method", "tr-jacobi")
    if do_sample is None:
        do_sample = temperature > 0
    if do_sample:
        options.update(do_sample=True, temperature=temperature or 1.0)
    result = generate(model, input_ids, max_new_tokens, eos_token_id=sorted(eos), **options)
    return result.output_ids.to(device), result.new_tokens, result.steps, result.accept_lengths
