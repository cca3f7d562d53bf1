"""Peers measured beside msn: transformers' own `generate`, greedy and prompt lookup.

`load_reference(path)` loads the same checkpoint as a transformers `LlamaForCausalLM` (a GGUF
file goes through msn's cached conversion), and `generate_reference` returns what the bench
reads from an msn result: output ids, new tokens, steps (forward passes after prefill; for
prompt lookup, transformers does not report them, so they count as new tokens - 1) and timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

METHODS = {
    "hf-greedy": {},
    "hf-prompt-lookup": {"prompt_lookup_num_tokens": 10},
}


@dataclass
class ReferenceResult:
    output_ids: torch.Tensor
    new_tokens: int
    steps: int
    accept_lengths: list[int]
    total_seconds: float
    stop_reason: str | None = None
    tree: dict | None = field(default=None)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def load_reference(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import LlamaForCausalLM

    from msn.checkpoint import resolve_checkpoint

    model = LlamaForCausalLM.from_pretrained(resolve_checkpoint(path), dtype=dtype)
    return model.to(device).eval()


@torch.no_grad()
def generate_reference(model, prompt, max_new_tokens: int, method: str, eos_token_id=None):
    """transformers' greedy or prompt-lookup decoding of one prompt (a list of ids)."""
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=model.generation_config.pad_token_id or 0,
        **METHODS[method],
    )  # fmt: skip
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    steps = max(new - 1, 0)
    return ReferenceResult(out.cpu(), new, steps, [1] * steps, seconds, tree={"tree": method})
