"""JSONL reading, tokenisation through the chat template, and the noising collator."""

import json

import pytest
import torch
from conftest import build_tiny_tokenizer

from msn.data import IGNORE_INDEX, MSNCollator, build_examples, read_jsonl, tokenize_example


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tiny_tokenizer(chat_template=None)


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add two numbers"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
    ]
}
PAIR = {"prompt": "import os\n", "response": "import sys\n\nfor line in sys.stdin:\n    pass\n"}


def test_read_jsonl_reads_both_formats_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, "", PAIR])
    assert read_jsonl(path) == [CHAT, PAIR]


def test_malformed_lines_are_reported_together_with_line_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            CHAT,
            "{not json",
            {"prompt": "only a prompt"},
            {"messages": [{"role": "user", "content": "no answer"}]},
            PAIR,
            [1, 2],
            {"messages": [{"role": "assistant"}]},
        ],
    )
    with pytest.raises(ValueError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "5 malformed line(s)" in message
    for number in (2, 3, 4, 6, 7):
        assert f"line {number}:" in message
    assert "line 1:" not in message and "line 5:" not in message


def test_chat_goes_through_the_template(tokenizer):
    prompt, response = tokenize_example(CHAT, tokenizer)
    prompt_text = tokenizer.apply_chat_template(
        CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt).endswith("<|assistant|>")
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response) == CHAT["messages"][-1]["content"] + "<|end|>"


def test_pairs_use_the_template_when_there_is_one(tokenizer):
    prompt, response = tokenize_example(PAIR, tokenizer)
    assert tokenizer.decode(prompt) == "<|user|>" + PAIR["prompt"] + "<|end|><|assistant|>"
    assert tokenizer.decode(response) == PAIR["response"] + "<|end|>"


def test_pairs_are_plain_without_a_template_or_when_asked(tokenizer, plain_tokenizer):
    for tok, fmt in ((plain_tokenizer, "auto"), (tokenizer, "plain")):
        prompt, response = tokenize_example(PAIR, tok, pair_format=fmt)
        assert prompt[0] == tok.bos_token_id
        assert tok.decode(prompt[1:]) == PAIR["prompt"]
        assert tok.decode(response) == PAIR["response"] + "<|end|>"


def test_chats_without_a_template_raise_an_actionable_error(plain_tokenizer):
    with pytest.raises(ValueError, match="no chat template.*prompt"):
        tokenize_example(CHAT, plain_tokenizer)


def test_labels_mask_the_prompt_or_keep_it(tokenizer):
    (masked,) = build_examples([CHAT], tokenizer)
    (kept,) = build_examples([CHAT], tokenizer, mask_prompt=False)
    n = masked.source_len
    assert masked.input_ids == kept.input_ids == kept.labels
    assert masked.labels[:n] == [IGNORE_INDEX] * n
    assert masked.labels[n:] == masked.input_ids[n:]


def test_truncation_and_examples_whose_prompt_fills_max_length(tokenizer, caplog):
    (full,) = build_examples([PAIR], tokenizer, pair_format="plain")
    n = full.source_len
    (cut,) = build_examples([PAIR], tokenizer, max_length=n + 3, pair_format="plain")
    assert cut.input_ids == full.input_ids[: n + 3] and cut.source_len == n
    long_prompt = {"prompt": PAIR["prompt"] * 4, "response": "x"}
    examples = build_examples([PAIR, long_prompt], tokenizer, max_length=n + 1, pair_format="plain")
    assert len(examples) == 1 and "skipped 1 of 2" in caplog.text
    with pytest.raises(ValueError, match="max-length"):
        build_examples([PAIR], tokenizer, max_length=n, pair_format="plain")


def make_batch_examples(tokenizer):
    records = [CHAT, PAIR, {"prompt": "x", "response": "def f(): return 1\n" * 4}]
    return build_examples(records, tokenizer)


def test_collator_pads_and_keeps_labels_clean(tokenizer):
    examples = make_batch_examples(tokenizer)
    collate = MSNCollator(
        pad_token_id=tokenizer.pad_token_id, noise_len=5, generator=torch.Generator().manual_seed(0)
    )
    batch = collate(examples)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(examples), width)
    noised_somewhere = False
    for row, example in enumerate(examples):
        n, s = len(example.input_ids), example.source_len
        clean = torch.tensor(example.input_ids)
        assert batch["labels"][row, :n].tolist() == example.labels  # clean, prompt masked
        assert (batch["labels"][row, :s] == IGNORE_INDEX).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        inputs = batch["input_ids"][row, :n]
        assert torch.equal(inputs[:s], clean[:s]) and inputs[-1] == clean[-1]
        changed = (inputs != clean).nonzero().flatten()
        if len(changed):
            noised_somewhere = True
            assert changed.min() >= s and changed.max() - changed.min() < 5
    assert noised_somewhere


def test_collator_draws_noise_afresh_on_every_call(tokenizer):
    examples = make_batch_examples(tokenizer)
    collate = MSNCollator(tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    batches = [collate(examples) for _ in range(4)]
    assert any(not torch.equal(batches[0]["input_ids"], b["input_ids"]) for b in batches[1:])
    assert all(torch.equal(batches[0]["labels"], b["labels"]) for b in batches[1:])


def test_collator_noise_follows_the_global_seed_and_differs_per_rank(tokenizer):
    """Reproducible from torch's seed (restored on resume), yet distinct on each rank."""
    examples = make_batch_examples(tokenizer)

    def noised(rank: int) -> torch.Tensor:
        torch.manual_seed(42)  # what the Trainer does on every rank
        return MSNCollator(tokenizer.pad_token_id, num_spans=2, rank=rank)(examples)["input_ids"]

    assert torch.equal(noised(0), noised(0))
    assert not torch.equal(noised(0), noised(1))


def test_collator_without_noise_returns_clean_inputs(tokenizer):
    examples = make_batch_examples(tokenizer)
    for collate in (
        MSNCollator(tokenizer.pad_token_id, noise_len=0),
        MSNCollator(tokenizer.pad_token_id, noise_fraction=0.0),
    ):
        batch = collate(examples)
        for row, example in enumerate(examples):
            assert batch["input_ids"][row, : len(example.input_ids)].tolist() == example.input_ids


def test_collator_more_spans_noise_more_tokens(tokenizer):
    long = build_examples([{"prompt": "x", "response": "def add(a, b):\n" * 40}], tokenizer)
    changed = {}
    for spans in (1, 4):
        collate = MSNCollator(
            tokenizer.pad_token_id, num_spans=spans, generator=torch.Generator().manual_seed(0)
        )
        clean = torch.tensor(long[0].input_ids)
        changed[spans] = sum(int((collate(long)["input_ids"][0] != clean).sum()) for _ in range(50))
    assert changed[4] > 2 * changed[1]


def test_collator_rejects_bad_settings():
    with pytest.raises(ValueError, match="noise_fraction"):
        MSNCollator(0, noise_fraction=1.5)
