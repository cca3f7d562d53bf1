"""`msn train` end to end on a tiny random Llama: loss goes down, checkpoints load, resume works."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from msn.train import add_arguments, main, train

RECORDS = [
    {"prompt": "def add(a, b):\n", "response": "    return a + b\n"},
    {
        "prompt": "import os\n",
        "response": "import sys\n\nfor line in sys.stdin:\n    print(line)\n",
    },
    {
        "messages": [
            {"role": "user", "content": "The quick brown fox"},
            {"role": "assistant", "content": "jumps over the lazy dog."},
        ]
    },
    {"prompt": "Noise makes", "response": " the model robust to wrong context tokens."},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def tiny_args(model, data, output, *extra):
    return parse(
        "--model", model, "--data", data, "--output", output, "--batch-size", "4",
        "--lr", "3e-3", "--lr-scheduler", "constant", "--logging-steps", "1", *extra,
    )  # fmt: skip


def test_loss_decreases_and_the_checkpoint_loads(tiny_checkpoint, data, tmp_path):
    output = tmp_path / "run"
    args = tiny_args(tiny_checkpoint, data, output, "--max-steps", "30", "--eval-data", data)
    assert main(args) == 0
    summary = json.loads((output / "msn_train.json").read_text())
    losses = [log["loss"] for log in summary["loss_history"]]
    assert summary["global_step"] == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert summary["eval_loss"] < losses[0]

    assert (output / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size
    ids = torch.tensor([tokenizer("def add(a, b):\n")["input_ids"]])
    with torch.no_grad():
        reference = model(ids).logits.float()

    import msn

    if not hasattr(msn, "load_model"):
        pytest.skip("msn.load_model does not exist yet; transformers loading was checked")
    ours = msn.load_model(output, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), reference, atol=1e-4, rtol=1e-4)


class Interrupted(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    """Stand-in for a killed job: raise once checkpoint `step` is on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


def test_resume_continues_from_the_last_checkpoint(tiny_checkpoint, data, tmp_path):
    output = tmp_path / "run"
    args = tiny_args(tiny_checkpoint, data, output, "--max-steps", "6", "--save-steps", "1")
    with pytest.raises(Interrupted):
        train(args, callbacks=[InterruptAfterSave(3)])
    assert (output / "checkpoints" / "checkpoint-3").is_dir()
    assert not (output / "model.safetensors").exists()

    summary = train(
        tiny_args(
            tiny_checkpoint, data, output, "--max-steps", "6", "--save-steps", "1", "--resume"
        )
    )
    assert summary["global_step"] == 6
    assert [log["step"] for log in summary["loss_history"]] == [1, 2, 3, 4, 5, 6]

    # The interrupted-and-resumed run equals one that ran straight through.
    straight = tmp_path / "straight"
    train(tiny_args(tiny_checkpoint, data, straight, "--max-steps", "6", "--save-steps", "100"))
    resumed = AutoModelForCausalLM.from_pretrained(output).state_dict()
    for name, value in AutoModelForCausalLM.from_pretrained(straight).state_dict().items():
        torch.testing.assert_close(resumed[name], value, msg=name)


def test_resume_without_a_checkpoint_starts_fresh(tiny_checkpoint, data, tmp_path):
    args = tiny_args(
        tiny_checkpoint, data, tmp_path / "run", "--max-steps", "2", "--resume", "--no-noise"
    )
    summary = train(args)
    assert summary["global_step"] == 2 and summary["noise"]["noise_len"] == 0


def test_non_llama_models_are_rejected(data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(ValueError, match="'gpt2' model.*Llama"):
        train(tiny_args(tmp_path / "gpt2", data, tmp_path / "run", "--max-steps", "1"))


def test_lora_saves_an_adapter_and_a_merged_model_that_agree(tiny_checkpoint, data, tmp_path):
    import msn

    output = tmp_path / "lora"
    args = tiny_args(
        tiny_checkpoint, data, output, "--max-steps", "8", "--lora-rank", "4", "--merge"
    )
    summary = train(args)
    assert summary["lora"]["rank"] == 4
    assert (output / "adapter_model.safetensors").is_file()
    assert not (output / "model.safetensors").exists()  # only the adapter at the root
    merged = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float64)

    ids = torch.tensor([[3, 17, 42, 99, 5, 250]])
    with torch.no_grad():
        reference = merged(ids).logits
    base = msn.load_model(tiny_checkpoint, dtype=torch.float64)
    adapted = msn.load_model(tiny_checkpoint, dtype=torch.float64, adapter=output)
    with torch.no_grad():
        # The merged file rounds W + BA to float32 once; msn merges in float64.
        torch.testing.assert_close(adapted(ids), reference, atol=1e-6, rtol=1e-6)
        assert (base(ids) - reference).abs().max() > 1e-4  # the adapter did change the model


def test_distillation_loss_is_the_mean_kl_at_learned_positions():
    from msn.train import distillation_loss

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 4, 1, -100], [-100, 2, 3, 6, 0]])
    kls = []
    for b in range(2):
        for t in range(4):  # position t predicts labels[b, t + 1]
            if labels[b, t + 1] != -100:
                p = teacher[b, t].softmax(-1)
                q = student[b, t].softmax(-1)
                kls.append(float((p * (p.log() - q.log())).sum()))
    loss = distillation_loss(student, teacher, labels)
    assert loss.item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert distillation_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_distilling_from_the_base_learns_only_from_noise(tiny_checkpoint, data, tmp_path):
    """The teacher is the base model on clean inputs. The student starts equal to it (LoRA's B
    is zero), so without noise the KL is zero from the first step; with noise it is not."""
    import msn

    ids = torch.tensor([[3, 17, 42, 99, 5, 250]])
    base = msn.load_model(tiny_checkpoint, dtype=torch.float64)
    first_loss = {}
    for name, extra in (("plain", ["--no-noise"]), ("noised", ["--noise-len", "2"])):
        output = tmp_path / name
        args = tiny_args(
            tiny_checkpoint, data, output, "--max-steps", "6", "--lora-rank", "4",
            "--distill-from-base", *extra,
        )  # fmt: skip
        summary = train(args)
        assert summary["objective"] == "kl-to-base"
        first_loss[name] = summary["loss_history"][0]["loss"]
    assert first_loss["plain"] < 1e-6
    assert first_loss["noised"] > 1e-3
    adapted = msn.load_model(tiny_checkpoint, dtype=torch.float64, adapter=tmp_path / "noised")
    with torch.no_grad():
        assert (adapted(ids) - base(ids)).abs().max() > 1e-4  # the adapter learned something


def test_distilling_from_the_base_needs_lora(tiny_checkpoint, data, tmp_path):
    args = tiny_args(tiny_checkpoint, data, tmp_path / "full", "--distill-from-base")
    with pytest.raises(ValueError, match="--lora-rank"):
        train(args)
