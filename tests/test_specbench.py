"""Spec-Bench's forward-function interface."""

import subprocess
import sys

import torch

import msn
from msn.specbench import noise_forward


def test_noise_forward_takes_tensors_and_batch_encodings(tiny_checkpoint):
    model = msn.load_model(tiny_checkpoint, dtype=torch.float64)
    tokenizer = msn.load_tokenizer(tiny_checkpoint)
    encoding = tokenizer("def add(a, b):\n    return", return_tensors="pt")
    greedy = msn.generate(
        model, encoding["input_ids"], 20, method="greedy",
        eos_token_id=[*model.config.eos_token_ids, tokenizer.eos_token_id],
    )  # fmt: skip
    for inputs in (encoding, encoding["input_ids"]):
        output_ids, new_tokens, steps, accept_lengths = noise_forward(inputs, model, tokenizer, 20)
        assert torch.equal(output_ids, greedy.output_ids)
        assert new_tokens == greedy.new_tokens
        assert steps == len(accept_lengths) and sum(accept_lengths) == new_tokens - 1


def test_module_entry_point():
    completed = subprocess.run(
        [sys.executable, "-m", "msn", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("info", "generate", "bench", "train"):
        assert command in completed.stdout


def test_noise_forward_takes_spec_bench_temperature(tiny_checkpoint):
    model = msn.load_model(tiny_checkpoint, dtype=torch.float64)
    tokenizer = msn.load_tokenizer(tiny_checkpoint)
    ids = tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    greedy = noise_forward(ids, model, tokenizer, 12, temperature=0.0)
    assert torch.equal(greedy[0], noise_forward(ids, model, tokenizer, 12)[0])
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # as Spec-Bench seeds each choice
        runs.append(noise_forward(ids, model, tokenizer, 12, temperature=1.5)[0])
    assert torch.equal(runs[0], runs[1])
    sampled = msn.generate(
        model, ids, 12, method="greedy", do_sample=True, temperature=1.5, seed=3,
        eos_token_id=[*model.config.eos_token_ids, tokenizer.eos_token_id],
    )  # fmt: skip
    assert torch.equal(noise_forward(ids, model, tokenizer, 12, temperature=1.5, seed=3)[0],
                       sampled.output_ids)  # fmt: skip
    assert not torch.equal(sampled.output_ids, greedy[0])
