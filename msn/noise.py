"""MSN noise: replace a short span of the response with tokens drawn from the context.

`add_noise` is the paper's procedure for one example, exactly as `DESIGN.md` states it:

    start = rng.randrange(source_len, len(ids) - noise_len)
    for i in range(start, start + noise_len):
        ids[i] = rng.choice(ids[:i])

so the prompt and the last token never change, and each replacement is a token that occurs
earlier in the (already partly noised) sequence. `add_noise_batch` is the same procedure
vectorised over a padded batch with a `torch.Generator`, for collators.

Short responses never raise: the span shrinks to what fits between the prompt and the last
token, and a response of one token (or none) is returned unchanged. Position 0 is never noised
(there is nothing before it to draw from), so `source_len=0` behaves like `source_len=1`.
"""

from __future__ import annotations

import random

import torch


def _span(length: int, source_len: int, noise_len: int) -> tuple[int, int]:
    """First position that may be noised and the span length that fits, for one example."""
    if noise_len < 0:
        raise ValueError(f"noise_len must be >= 0, got {noise_len}")
    if source_len < 0:
        raise ValueError(f"source_len must be >= 0, got {source_len}")
    low = max(source_len, 1)
    return low, max(0, min(noise_len, length - 1 - low))


def add_noise(
    input_ids: list[int] | torch.Tensor,
    source_len: int,
    noise_len: int = 5,
    rng: random.Random | None = None,
) -> list[int] | torch.Tensor:
    """Return a copy of `input_ids` with one span of `noise_len` response tokens replaced.

    `input_ids` is a list of ints or a 1-D tensor; the result has the same type (a new list or
    a new tensor on the same device with the same dtype), and the caller's input is never
    modified. `rng` is a `random.Random` (the module-level generator when None); a seeded one
    reproduces the result. When the response (`input_ids[source_len:]`) has fewer than
    `noise_len + 1` tokens the span is shortened to `len(response) - 1` tokens, and nothing is
    noised when that is zero.
    """
    rng = random if rng is None else rng
    is_tensor = isinstance(input_ids, torch.Tensor)
    if is_tensor and input_ids.dim() != 1:
        raise ValueError(
            f"add_noise takes one example (a 1-D tensor), got shape {tuple(input_ids.shape)}; "
            "use add_noise_batch for batches"
        )
    ids = input_ids.tolist() if is_tensor else list(input_ids)
    low, span = _span(len(ids), source_len, noise_len)
    if span > 0:
        start = rng.randrange(low, len(ids) - span)
        for i in range(start, start + span):
            ids[i] = rng.choice(ids[:i])
    if is_tensor:
        return torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
    return ids


def add_noise_batch(
    input_ids: torch.Tensor,
    source_lens: torch.Tensor,
    lengths: torch.Tensor | None = None,
    noise_len: int = 5,
    num_spans: int | torch.Tensor = 1,
    noise_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise a right-padded batch `[B, T]`; returns a new tensor, the input is left unchanged.

    Row b holds `lengths[b]` real tokens (all T when `lengths` is None) of which the first
    `source_lens[b]` are the prompt. Each row is noised with probability `noise_fraction`; a
    noised row gets `num_spans` (an int or a `[B]` tensor) spans, each placed and filled by the
    single-example procedure (uniform start, each replacement drawn uniformly from the tokens
    before it) and applied left to right. Spans may overlap. Padding, the prompt and the last
    real token never change. Randomness comes from `generator` (torch's global generator when
    None, which the Trainer seeds and DataLoader workers reseed).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    batch, width = input_ids.shape
    device = input_ids.device
    if lengths is None:
        lengths = torch.full((batch,), width, device=device)
    source_lens = torch.as_tensor(source_lens, device=device).long()
    lengths = torch.as_tensor(lengths, device=device).long()
    num_spans = torch.as_tensor(num_spans, device=device).long().expand(batch)
    if (source_lens < 0).any() or (num_spans < 0).any() or noise_len < 0:
        raise ValueError("source_lens, num_spans and noise_len must be non-negative")

    def uniform() -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device)

    low = source_lens.clamp(min=1)
    span = (lengths - 1 - low).clamp(min=0, max=noise_len)  # (B,)
    noised_rows = uniform() < noise_fraction
    # Start uniform in [low, length - span), as rng.randrange(low, length - span); float32
    # rounding can give u * n == n, so every draw is clamped below n.
    choices = (lengths - span - low).clamp(min=1)  # (B,)
    unused = width + noise_len
    starts = [
        torch.where(
            k < num_spans, low + torch.minimum((uniform() * choices).long(), choices - 1), unused
        )
        for k in range(int(num_spans.max()) if batch else 0)
    ]
    ids = input_ids.clone()
    if not starts:
        return ids
    rows = torch.arange(batch, device=device)
    # Spans go left to right, so a later span never rewrites a token that an earlier
    # replacement copied: every replacement still occurs earlier in the final sequence.
    for start in torch.stack(starts).sort(dim=0).values:  # (spans, B) -> (B,)
        active = noised_rows & (start < unused) & (span > 0)
        for t in range(noise_len):
            pos = (start + t).clamp(max=width - 1)  # (B,)
            source = torch.minimum((uniform() * pos).long(), pos - 1)  # as rng.choice(ids[:pos])
            write = active & (t < span)
            ids[rows, pos] = torch.where(write, ids[rows, source], ids[rows, pos])
    return ids
