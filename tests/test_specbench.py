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
