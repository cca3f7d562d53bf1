"""Checks of decoding input at the API boundary.

Bad input gets a ValueError that names the problem and the fix, before any tensor work, instead
of an IndexError deep inside the model or a silent coercion (a float prompt rounded to ints, an
EOS id of 2.7 taken as 2). Trees are checked against the vocabulary (a depth cannot have more
distinct candidates than there are tokens) and the context (a tree that cannot fit after the
prompt would silently decode one token per step).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from msn_kernels.greedy_verify import MAX_TRITON_NODES, verify_uses_triton


def check_generate_inputs(
    model: Any,
    input_ids: Any,
    max_new_tokens: Any,
    method: str,
    eos_token_id: Any,
    tree: Any,
) -> None:
    """Validate the arguments of `msn.generate` that its decoders would otherwise coerce."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}.")
    if method == "greedy" and tree is not None:
        raise ValueError(
            "method='greedy' decodes one token per step and takes no tree; pass "
            "method='tr-jacobi' with tree=... to decode with a tree."
        )
    check_token_ids(input_ids, vocab_size(model), "input_ids")
    check_eos_token_id(eos_token_id)


def vocab_size(model: Any) -> int | None:
    """The number of token ids the model embeds, when it says (msn and transformers models)."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_token_ids(ids: Any, vocab: int | None, name: str = "input_ids") -> None:
    """`ids` (a tensor or a list of ints) must be integers in [0, vocab)."""
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(
                f"{name} must hold integer token ids, got a {ids.dtype} tensor; pass the "
                "tokenizer's ids as a torch.long tensor (or a list of ints)."
            )
        values = ids.detach().reshape(-1)
    elif isinstance(ids, Sequence) and not isinstance(ids, str | bytes):
        flat = _flatten(ids)
        bad = [v for v in flat if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise ValueError(
                f"{name} must hold integer token ids, got {bad[0]!r} "
                f"({type(bad[0]).__name__}); pass the tokenizer's ids (ints), not text or floats."
            )
        values = torch.tensor([int(v) for v in flat], dtype=torch.long)
    else:
        raise ValueError(
            f"{name} must be a [1, L] tensor or a list of ints, got {type(ids).__name__}."
        )
    if vocab is None or values.numel() == 0:
        return
    outside = values[(values < 0) | (values >= vocab)]
    if outside.numel():
        shown = sorted(set(outside.tolist()))
        listed = ", ".join(map(str, shown[:10])) + (" ..." if len(shown) > 10 else "")
        raise ValueError(
            f"{name} holds token id(s) outside the model's vocabulary of {vocab} "
            f"(valid ids are 0..{vocab - 1}): {listed}; the tokenizer does not match the model, "
            "or the ids were built by hand."
        )


def _flatten(ids: Sequence) -> list:
    flat: list = []
    for item in ids:
        if isinstance(item, Sequence) and not isinstance(item, str | bytes):
            flat += _flatten(item)
        elif isinstance(item, Tensor):
            flat += item.reshape(-1).tolist() if not item.dtype.is_floating_point else [item]
        else:
            flat.append(item)
    return flat


def check_eos_token_id(eos_token_id: Any) -> None:
    """An int, a list of ints, an integer tensor or None; floats and bools are refused."""
    if eos_token_id is None:
        return
    if isinstance(eos_token_id, Tensor):
        bad = eos_token_id.dtype.is_floating_point or eos_token_id.dtype == torch.bool
        ids = [] if bad else eos_token_id.reshape(-1).tolist()
    else:
        single = not isinstance(eos_token_id, Sequence) or isinstance(eos_token_id, str)
        ids = [eos_token_id] if single else list(eos_token_id)
        bad = any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids)
    if bad or any(t < 0 for t in ids):
        raise ValueError(
            f"eos_token_id must be a token id (an int >= 0), a list of them, or None for the "
            f"checkpoint's own; got {eos_token_id!r}."
        )


def check_prompt_fits(length: int, limit: int, name: str = "the prompt") -> None:
    """Refuse a prompt longer than the model's context (`name` says which prompt)."""
    if length > limit:
        raise ValueError(
            f"{name} has {length} tokens, more than the model's context of {limit}; shorten "
            "it (or load the model with a larger max_seq_len if its RoPE scaling allows)."
        )


def check_tree(tree: Any, model: Any, prompt_len: int, limit: int, max_new_tokens: int) -> None:
    """Refuse a tree wider than the vocabulary; warn when it cannot fit the context at all."""
    if not hasattr(tree, "max_top_k"):  # None (greedy) or "auto", which sizes itself
        return
    vocab = vocab_size(model)
    if vocab is not None and tree.max_top_k > vocab:
        raise ValueError(
            f"the tree needs {tree.max_top_k} distinct candidates at one depth, but the model's "
            f"vocabulary has only {vocab} tokens; use a narrower tree (e.g. tree='paper' or "
            "'comb:10,1,1,1,1')."
        )
    dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
    big = tree.num_nodes > MAX_TRITON_NODES
    if big and isinstance(dtype, torch.dtype) and verify_uses_triton(dtype, torch.device(device)):
        raise ValueError(
            f"the tree has {tree.num_nodes} nodes, but the Triton verification kernel takes at "
            f"most {MAX_TRITON_NODES}; use a smaller tree (e.g. tree='paper', 69 nodes, or "
            "tree='auto'), or MSN_KERNELS=torch for the PyTorch kernels, which have no limit."
        )
    room = limit - prompt_len
    if max_new_tokens > 1 and tree.num_nodes > room:
        warnings.warn(
            f"the tree has {tree.num_nodes} nodes, but after the prompt ({prompt_len} tokens) "
            f"the model's context of {limit} positions leaves room for {max(room, 0)}; "
            "decoding falls back to one token per step (plain greedy). Use a smaller tree "
            "(e.g. tree='chain:3'), a shorter prompt, or load the model with a larger "
            "max_seq_len.",
            stacklevel=4,  # the caller of generate (under torch.no_grad's wrapper)
        )
