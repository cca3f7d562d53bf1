"""Training data for MSN fine-tuning: JSONL examples, tokenisation and a noising collator.

Each line of the JSONL file is one example, either a chat in the Hugging Face format

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

or a pair `{"prompt": "...", "response": "..."}`. The prompt is everything the model is given
(for a chat: every message before the last assistant turn, rendered by the tokenizer's chat
template with the generation prompt); the response is what it learns to produce (the last
assistant turn, ending with the end-of-sequence token, unless the record has `"truncated": true`:
a response cut at a length limit gets no end token). `source_len` is the prompt's length in
tokens: MSN noise goes only after it, and the loss is taken only there unless asked otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from msn.noise import add_noise_batch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PairFormat = Literal["auto", "chat", "plain"]


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`; specials take the first ids.

    For training a small model from scratch (test fixtures); wrap it in a
    `transformers.PreTrainedTokenizerFast` to use it with the rest of the library.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate every line; all malformed lines are reported together in one error."""
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {number}: not valid JSON ({e.msg})")
                continue
            problem = _check_example(example)
            if problem:
                errors.append(f"line {number}: {problem}")
            else:
                examples.append(example)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(
            f"{path}: {len(errors)} malformed line(s); each line must be "
            '{"messages": [{"role": ..., "content": ...}, ...]} ending with an assistant turn, '
            f'or {{"prompt": str, "response": str}}:\n  {shown}{more}'
        )
    if not examples:
        raise ValueError(f"{path}: no examples found (the file is empty)")
    return examples


def _check_example(example: Any) -> str | None:
    """Why an example is malformed, or None when it is fine."""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {type(example).__name__}"
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                return f'messages[{i}] must be an object with string "role" and "content"'
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's (it is the response learned)"
        return None
    if isinstance(example.get("prompt"), str) and isinstance(example.get("response"), str):
        return None
    return 'expected a "messages" list or string "prompt" and "response" fields'


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            'the data holds chats ("messages") but the tokenizer has no chat template; set '
            "tokenizer.chat_template (or add chat_template.jinja to the checkpoint), or write "
            'the data as {"prompt": ..., "response": ...} pairs, which are tokenised plainly '
            "as <bos> prompt / response <eos>"
        )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(
    example: dict[str, Any], tokenizer: Any, pair_format: PairFormat = "auto"
) -> tuple[list[int], list[int]]:
    """Prompt and response token ids of one validated example.

    Chats go through the chat template. Pairs go through it too when `pair_format` is "chat"
    (or "auto" and the tokenizer has a template); "plain" gives `[bos] + prompt` and
    `response + [eos]`. A response ends with the eos token, unless the record says
    `"truncated": true` (a response cut at a length limit, which must not teach the model to
    stop there).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so responses can end")
    if "messages" in example:
        messages = example["messages"]
    elif pair_format == "chat" or (pair_format == "auto" and tokenizer.chat_template):
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]},
        ]
    else:
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        end = [] if example.get("truncated") else [eos]
        return bos + _encode(tokenizer, example["prompt"]), _encode(
            tokenizer, example["response"]
        ) + end
    _require_template(tokenizer)
    prompt_text = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    # The response is what the template adds after the generation prompt (the content and its
    # end-of-turn marker); templates that do not extend the prompt text get content + eos.
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text) :]
    else:
        response_text = messages[-1]["content"]
    response = _encode(tokenizer, response_text)
    if eos in response:
        del response[len(response) - response[::-1].index(eos) :]  # nothing after the turn's end
    truncated = bool(example.get("truncated"))
    if truncated and response and response[-1] == eos:
        response.pop()
    if not truncated and (not response or response[-1] != eos):
        response.append(eos)
    return _encode(tokenizer, prompt_text), response


@dataclass
class Example:
    """One tokenised training example; `labels` are the clean targets, -100 where ignored."""

    input_ids: list[int]
    labels: list[int]
    source_len: int


def build_examples(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int = 1024,
    mask_prompt: bool = True,
    pair_format: PairFormat = "auto",
) -> list[Example]:
    """Tokenise records, truncating each to `max_length` tokens from the right.

    Examples whose prompt fills `max_length` leave no response to learn from; they are skipped
    and counted in a warning (raise `max_length` to keep them).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples, skipped = [], []
    for index, record in enumerate(records):
        prompt, response = tokenize_example(record, tokenizer, pair_format)
        if len(prompt) >= max_length:
            skipped.append(index)
            continue
        ids = (prompt + response)[:max_length]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :] if mask_prompt else list(ids)
        examples.append(Example(ids, labels, len(prompt)))
    if skipped:
        logger.warning(
            "skipped %d of %d examples whose prompt alone fills max_length=%d (first: %s)",
            len(skipped),
            len(records),
            max_length,
            skipped[:10],
        )
    if not examples:
        raise ValueError(f"no example fits max_length={max_length}; raise --max-length")
    return examples


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 1024,
    mask_prompt: bool = True,
    pair_format: PairFormat = "auto",
) -> list[Example]:
    """`read_jsonl` then `build_examples`."""
    return build_examples(read_jsonl(path), tokenizer, max_length, mask_prompt, pair_format)


class MSNCollator:
    """Pad a list of `Example`s into a batch and noise its inputs afresh on every call.

    The labels are always the clean tokens (noise never reaches them). `noise_len` tokens per
    span, `num_spans` spans per example, a `noise_fraction` of examples noised; `noise_len=0`
    or `noise_fraction=0` gives plain fine-tuning. Randomness comes from `generator`, or, when
    None, from a per-batch generator seeded by torch's global one plus `rank`. The global
    generator is seeded by the Trainer and restored on resume, so the noise is reproducible;
    the rank offset gives each data-parallel process its own noise, although the Trainer seeds
    every process alike. `clean_inputs=True` also returns the un-noised `clean_input_ids`, for
    training against the base model's own predictions on them (`msn train --distill-from-base`).
    """

    def __init__(
        self,
        pad_token_id: int,
        noise_len: int = 5,
        noise_fraction: float = 1.0,
        num_spans: int = 1,
        generator: torch.Generator | None = None,
        rank: int = 0,
        clean_inputs: bool = False,
    ) -> None:
        if noise_len < 0 or num_spans < 0 or not 0.0 <= noise_fraction <= 1.0:
            raise ValueError(
                "noise_len and num_spans must be >= 0 and noise_fraction in [0, 1], got "
                f"{noise_len}, {num_spans}, {noise_fraction}"
            )
        self.pad_token_id = pad_token_id
        self.noise_len = noise_len
        self.noise_fraction = noise_fraction
        self.num_spans = num_spans
        self.generator = generator
        self.rank = rank
        self.clean_inputs = clean_inputs

    def _batch_generator(self) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        seed = int(torch.randint(0, 2**62, (1,))) + self.rank
        return torch.Generator().manual_seed(seed)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        width = int(lengths.max())
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
            labels[row, : len(example.labels)] = torch.tensor(example.labels)
        attention_mask = torch.arange(width)[None, :] < lengths[:, None]  # (B, T)
        batch = {"clean_input_ids": input_ids} if self.clean_inputs else {}
        if self.noise_len and self.num_spans and self.noise_fraction:
            input_ids = add_noise_batch(
                input_ids,
                torch.tensor([e.source_len for e in examples]),
                lengths,
                noise_len=self.noise_len,
                num_spans=self.num_spans,
                noise_fraction=self.noise_fraction,
                generator=self._batch_generator(),
            )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask.long(),
            "labels": labels,
            **batch,
        }
