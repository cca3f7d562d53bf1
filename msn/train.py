"""`msn train`: fine-tune a Llama-family model with MSN noise on the transformers Trainer.

    msn train --model PATH_OR_HUB_ID --data train.jsonl --output runs/my-msn

The data is JSONL (see `msn.data`). Each batch gets fresh noise in the response part of its
inputs while the labels stay clean; `--no-noise` trains the plain baseline with everything else
equal. The final model (safetensors) and its tokenizer land in `--output`, checkpoints in
`--output/checkpoints`, and `--resume` continues from the last checkpoint after an interruption.

Because it is the plain `transformers.Trainer`, the same command scales out unchanged:

    torchrun --nproc_per_node 8 -m msn train ...       # data parallel on 8 GPUs
    accelerate launch -m msn train ...                 # FSDP / DeepSpeed from `accelerate config`
    msn train ... --deepspeed ds_zero3.json            # or name a DeepSpeed config directly
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from msn.checkpoint import load_config, open_safetensors, safetensors_files
from msn.data import IGNORE_INDEX, MSNCollator, load_examples
from msn.gguf import gguf_checkpoint, is_gguf

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024
TRAINER_STATE = "trainer_state.json"  # written last by the Trainer: marks a finished save
LOSS_FILE = "msn_loss.json"  # the run's summed loss so far, kept with each checkpoint
CHECKPOINT = re.compile(r"checkpoint-\d+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `msn train`."""
    io = parser.add_argument_group("model and data")
    io.add_argument("--model", required=True, help="base model: local directory or hub id")
    io.add_argument(
        "--data", required=True, help="training data, JSONL (messages or prompt/response)"
    )
    io.add_argument("--eval-data", help="held-out JSONL; its clean loss is reported at the end")
    io.add_argument("--output", required=True, help="directory for the final model and checkpoints")
    io.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate examples to this many tokens (default: the model's context, at most 1024)",
    )
    io.add_argument("--keep-prompt-loss", action="store_true", help="also learn the prompt tokens")
    io.add_argument(
        "--pair-format",
        choices=["auto", "chat", "plain"],
        default="auto",
        help="prompt/response pairs through the chat template (auto: if there is one)",
    )

    noise = parser.add_argument_group("MSN noise")
    noise.add_argument("--noise-len", type=int, default=5, help="tokens per noise span (paper: 5)")
    noise.add_argument("--spans", type=int, default=1, help="noise spans per example (paper: 1)")
    noise.add_argument(
        "--noise-fraction", type=float, default=1.0, help="fraction of examples noised"
    )
    noise.add_argument("--no-noise", action="store_true", help="plain fine-tuning, the baseline")

    lora = parser.add_argument_group("LoRA (through peft; full fine-tuning without --lora-rank)")
    lora.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r; 0 trains all weights")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 r)")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-targets",
        default="all-linear",
        help="comma-separated module names (q_proj,v_proj,...) or all-linear (default)",
    )
    lora.add_argument(
        "--distill-from-base",
        action="store_true",
        help="learn the base model's next-token distribution on the clean inputs (KL) instead "
        "of the data's tokens: keeps the base's behaviour; needs --lora-rank",
    )
    lora.add_argument(
        "--merge",
        action="store_true",
        help="also save the base model with the adapter merged, in OUTPUT/merged",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=float, default=1.0)
    opt.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    opt.add_argument("--lr", type=float, default=2e-5)
    opt.add_argument("--lr-scheduler", default="cosine")
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--batch-size", type=int, default=8, help="per device")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument("--save-steps", type=int, default=500)
    run.add_argument("--save-total-limit", type=int, default=2)
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--deepspeed", help="DeepSpeed config JSON")
    run.add_argument("--fsdp", default="", help='FSDP mode, e.g. "full_shard auto_wrap"')
    run.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (default: none)")


def load_base_model(path: str) -> LlamaForCausalLM:
    """A Llama-architecture causal LM in float32 (mixed precision is the Trainer's job).

    Only safetensors are read, as by `msn.load_model`: pickle files can run code. A local
    directory is checked first, so a pickle-only, truncated or corrupt checkpoint, or an index
    naming files outside it, is a clear error that names the file.
    """
    if not str(path).strip():
        raise ValueError("--model is empty; pass a checkpoint directory, a .gguf file or a hub id")
    local = Path(path).is_dir()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as error:  # a malformed config.json fails in many ways inside transformers
        if local:
            load_config(Path(path))  # names the field at fault
        raise ValueError(
            f"{path}: cannot read its config ({type(error).__name__}: {error})"
        ) from error
    if config.model_type != "llama":
        raise ValueError(
            f"{path} is a {config.model_type!r} model; msn train supports the Llama "
            "architecture (model_type 'llama': Llama 2/3, DeepSeek-Coder and other Llama-style "
            "checkpoints)"
        )
    if local:
        load_config(Path(path))
        safetensors_files(Path(path))
    try:
        return LlamaForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, use_safetensors=True
        )
    except OSError as error:  # e.g. a hub repository with pickle weights only
        raise ValueError(
            f"{path}: no safetensors weights could be loaded ({error}); msn train reads "
            "safetensors only, since pickle files can run code."
        ) from error


def wrap_lora(model: LlamaForCausalLM, args: argparse.Namespace):
    """The model with LoRA adapters on `args.lora_targets`; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ValueError("--lora-rank needs peft: pip install peft (or msn[train])") from error
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be positive, got {args.lora_rank}")
    targets = args.lora_targets
    lora_config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def save_merged(model, tokenizer, directory: Path) -> None:
    """The base weights with the LoRA update folded in, as a plain safetensors checkpoint."""
    merged = model.merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def resolve_max_length(requested: int | None, context: int) -> int:
    """`--max-length`: the model's context (at most 1024) by default; past the context, refused."""
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, context)
    if requested < 2:
        raise ValueError(f"--max-length must be at least 2, got {requested}")
    if requested > context:
        raise ValueError(
            f"--max-length {requested} is longer than the model's context "
            f"(max_position_embeddings = {context}); positions past it were never trained and "
            f"RoPE does not extrapolate: pass --max-length {context} or less."
        )
    return requested


def check_example_ids(examples: list, vocab: int, source: str | None, model: str) -> None:
    """Every token id must index the model's embeddings (a mismatched tokenizer breaks this)."""
    bad = sorted({t for e in examples for t in e.input_ids if not 0 <= t < vocab})
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise ValueError(
            f"{source}: the tokenizer produced token id(s) outside the vocabulary of {model} "
            f"({vocab} tokens, ids 0..{vocab - 1}): {shown}; the tokenizer does not match the "
            "model: train with the model's own tokenizer (saved next to its config.json)."
        )


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint is not complete (None when it is).

    The Trainer writes trainer_state.json last, so a checkpoint without it was cut short; and
    every weights or state file in it must be whole: safetensors headers must cover their file,
    and torch.save files (optimizer, scheduler, RNG state) must end with their zip directory.
    """
    state = checkpoint / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save was interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE} is unreadable ({error})"
    for file in sorted(checkpoint.iterdir()):
        if file.suffix == ".safetensors":
            try:
                with open_safetensors(file):
                    pass
            except ValueError as error:
                return str(error)
        elif file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
            return f"{file.name} is truncated or corrupt"
    return None


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint-N under `checkpoints` that was fully written; skips broken ones."""
    if not checkpoints.is_dir():
        return None
    numbered = [p for p in checkpoints.iterdir() if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        logger.warning(
            "--resume: skipping %s, which is incomplete: %s; falling back to an earlier checkpoint",
            candidate,
            problem,
        )
    return None


def checkpoint_loss(checkpoint: Path | None) -> tuple[int, float]:
    """(global step, summed training loss of all steps so far) at a checkpoint; (0, 0) for none.

    The sum is stored by `_MSNTrainer`; for a checkpoint without it, it is rebuilt from the
    logged losses (each the mean over its logging interval).
    """
    if checkpoint is None:
        return 0, 0.0
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    step = int(state["global_step"])
    saved = checkpoint / LOSS_FILE
    if saved.is_file():
        try:
            record = json.loads(saved.read_text(encoding="utf-8"))
            if record.get("global_step") == step:
                return step, float(record["loss_sum"])
        except (ValueError, KeyError, TypeError):
            pass
    total, previous, last = 0.0, 0, 0.0
    for log in state.get("log_history", []):
        if "loss" in log and log.get("step", 0) <= step:
            total += log["loss"] * (log["step"] - previous)
            previous, last = log["step"], log["loss"]
    return step, total + last * (step - previous)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels):
    """Mean KL(teacher || student) of the next-token distributions at the learned positions.

    `*_logits` are `[B, T, V]` and `labels` `[B, T]` in the transformers convention: position t
    predicts token t + 1, and labels of -100 (prompt, padding) are not learned. Computed in
    float32, on the learned positions only, so the `[N, V]` softmaxes stay small.
    """
    learned = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    if not learned.any():
        return student_logits.sum() * 0.0  # keeps the graph for an all-prompt batch
    student = student_logits[:, :-1][learned].float().log_softmax(-1)  # (N, V)
    teacher = teacher_logits[:, :-1][learned].float().log_softmax(-1)  # (N, V)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


class _MSNTrainer(Trainer):
    """The Trainer, with the summed loss of the run so far stored in every checkpoint.

    So a resumed run reports the mean loss of the whole run, not of its resumed part only.
    With `distill_from_base`, a batch carrying `clean_input_ids` is learned from the base
    model's predictions (the adapter switched off) on the clean tokens rather than from its
    labels: noise then teaches only how to recover from a corrupted context, and the clean
    behaviour stays the base's, where learning its greedy answers token by token sharpens the
    model towards them (and towards their loops).
    """

    loss_before = 0.0  # summed loss of the steps trained before this train() call
    distill_from_base = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        clean = inputs.pop("clean_input_ids", None)
        if not self.distill_from_base or clean is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            teacher = model(input_ids=clean, attention_mask=inputs["attention_mask"]).logits
        loss = distillation_loss(outputs.logits, teacher, labels)
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        pending = getattr(self, "_tr_loss", None)
        so_far = getattr(self, "_total_loss_scalar", None)
        if not self.args.should_save or pending is None or so_far is None:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        record = {
            "global_step": self.state.global_step,
            "loss_sum": self.loss_before + so_far + float(pending.item()),
        }
        (folder / LOSS_FILE).write_text(json.dumps(record) + "\n")


def train(args: argparse.Namespace, callbacks: list[TrainerCallback] | None = None) -> dict:
    """Run `msn train` and return its summary (also written to OUTPUT/msn_train.json)."""
    output = Path(args.output)
    checkpoints = output / "checkpoints"
    noise_len = 0 if args.no_noise else args.noise_len
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file; pass a JSONL file of examples")

    # Training arguments first: under DeepSpeed ZeRO-3 they must exist before the model is
    # loaded, so that it is partitioned as it loads instead of built whole on every rank.
    training_args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        bf16=args.bf16,
        # Without a GPU the Trainer must be told so before it accepts --bf16 (CPU autocast,
        # which is fast on CPUs with AMX or AVX512-BF16).
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        deepspeed=args.deepspeed,
        fsdp=args.fsdp,
        report_to=args.report_to,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator needs source_len
    )

    # Model and tokenizer (a GGUF file is converted once and read from the cache).
    model_path = str(gguf_checkpoint(args.model)) if is_gguf(args.model) else args.model
    model = load_base_model(model_path)
    max_length = resolve_max_length(args.max_length, model.config.max_position_embeddings)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.distill_from_base and not args.lora_rank:
        raise ValueError(
            "--distill-from-base learns from the base model with the adapter switched off, "
            "so it needs LoRA: add --lora-rank (e.g. 16)"
        )
    if args.lora_rank:
        model = wrap_lora(model, args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id  # padding is masked out of attention and loss

    # Data: clean examples; the collator noises the inputs of every batch afresh.
    mask_prompt = not args.keep_prompt_loss
    examples = load_examples(args.data, tokenizer, max_length, mask_prompt, args.pair_format)
    # Held-out data is read now, so that a bad file fails before training, not after it.
    eval_examples = None
    if args.eval_data:
        eval_examples = load_examples(
            args.eval_data, tokenizer, max_length, mask_prompt, args.pair_format
        )
    vocab = model.config.vocab_size
    check_example_ids(examples, vocab, args.data, model_path)
    check_example_ids(eval_examples or [], vocab, args.eval_data, model_path)
    if not 0 <= pad_token_id < vocab:
        raise ValueError(
            f"the tokenizer's padding id {pad_token_id} is outside the vocabulary of {model_path} "
            f"({vocab} tokens); the tokenizer does not match the model."
        )
    collator = MSNCollator(
        pad_token_id, noise_len, args.noise_fraction, args.spans,
        rank=training_args.process_index, clean_inputs=args.distill_from_base,
    )  # fmt: skip
    logger.info("%d training examples from %s", len(examples), args.data)

    trainer = _MSNTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=examples,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.distill_from_base = args.distill_from_base

    # Train, from the last complete checkpoint when resuming.
    if args.resume:
        resume_from = last_complete_checkpoint(checkpoints)
        if resume_from is None:
            logger.warning(
                "--resume: no checkpoint in %s, starting from the base model", checkpoints
            )
    else:
        resume_from = None
        earlier = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if earlier is not None:
            logger.warning(
                "%s holds checkpoints of an earlier run (last: %s); this run starts from the "
                "base model and its checkpoints will mix with them: pass --resume to continue "
                "that run, or choose a new --output",
                checkpoints,
                earlier,
            )
    start_step, trainer.loss_before = checkpoint_loss(resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    # The mean loss over the whole run, also when it was resumed (the Trainer reports only the
    # steps of this call: 0.0 when a finished run is resumed).
    steps_now = result.global_step - start_step
    loss_sum = trainer.loss_before + result.training_loss * steps_now
    train_loss = loss_sum / result.global_step if result.global_step else 0.0

    # Save the final model (or adapter) and tokenizer at the root of the output directory.
    trainer.save_model(str(output))
    if args.lora_rank and args.merge and trainer.is_world_process_zero():
        save_merged(trainer.model, tokenizer, output / "merged")
    summary: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "noise": {"noise_len": noise_len, "spans": args.spans, "fraction": args.noise_fraction},
        "objective": "kl-to-base" if args.distill_from_base else "cross-entropy",
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets}
        if args.lora_rank
        else None,
        "max_length": max_length,
        "global_step": result.global_step,
        "train_loss": train_loss,
        "loss_history": [
            {"step": log["step"], "loss": log["loss"]}
            for log in trainer.state.log_history
            if "loss" in log
        ],
    }

    # Held-out loss on clean inputs: noise is a training device only.
    if eval_examples is not None:
        trainer.data_collator = MSNCollator(pad_token_id, noise_len=0)
        eval_loss = trainer.evaluate(eval_examples)["eval_loss"]
        summary["eval_loss"] = eval_loss
        summary["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
    if trainer.is_world_process_zero():
        (output / "msn_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = train(args)
    logger.info(
        "done: %d steps, train loss %.4f%s; model saved to %s",
        summary["global_step"],
        summary["train_loss"],
        f", held-out loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "",
        args.output,
    )
    return 0
