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

from msn.data import MSNCollator, load_examples
from msn.gguf import gguf_checkpoint, is_gguf

logger = logging.getLogger(__name__)


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
        "--max-length", type=int, default=1024, help="truncate examples to this many tokens"
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
    """A Llama-architecture causal LM in float32 (mixed precision is the Trainer's job)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type != "llama":
        raise ValueError(
            f"{path} is a {config.model_type!r} model; msn train supports the Llama "
            "architecture (model_type 'llama': Llama 2/3, DeepSeek-Coder and other Llama-style "
            "checkpoints)"
        )
    return LlamaForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)


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


def train(args: argparse.Namespace, callbacks: list[TrainerCallback] | None = None) -> dict:
    """Run `msn train` and return its summary (also written to OUTPUT/msn_train.json)."""
    output = Path(args.output)
    checkpoints = output / "checkpoints"
    noise_len = 0 if args.no_noise else args.noise_len

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
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:
        model = wrap_lora(model, args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id  # padding is masked out of attention and loss

    # Data: clean examples; the collator noises the inputs of every batch afresh.
    mask_prompt = not args.keep_prompt_loss
    examples = load_examples(args.data, tokenizer, args.max_length, mask_prompt, args.pair_format)
    collator = MSNCollator(
        pad_token_id, noise_len, args.noise_fraction, args.spans,
        rank=training_args.process_index,
    )  # fmt: skip
    logger.info("%d training examples from %s", len(examples), args.data)

    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=examples,
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    # Train, from the last checkpoint when resuming.
    resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if args.resume and resume_from is None:
        logger.warning("--resume: no checkpoint in %s, starting from the base model", checkpoints)
    if not args.resume and resume_from is not None:
        logger.warning(
            "%s holds checkpoints of an earlier run (last: %s); this run starts from the base "
            "model and its checkpoints will mix with them: pass --resume to continue that run, "
            "or choose a new --output",
            checkpoints,
            resume_from,
        )
    result = trainer.train(resume_from_checkpoint=resume_from if args.resume else None)

    # Save the final model (or adapter) and tokenizer at the root of the output directory.
    trainer.save_model(str(output))
    if args.lora_rank and args.merge and trainer.is_world_process_zero():
        save_merged(trainer.model, tokenizer, output / "merged")
    summary: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "noise": {"noise_len": noise_len, "spans": args.spans, "fraction": args.noise_fraction},
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets}
        if args.lora_rank
        else None,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "loss_history": [
            {"step": log["step"], "loss": log["loss"]}
            for log in trainer.state.log_history
            if "loss" in log
        ],
    }

    # Held-out loss on clean inputs: noise is a training device only.
    if args.eval_data:
        eval_examples = load_examples(
            args.eval_data, tokenizer, args.max_length, mask_prompt, args.pair_format
        )
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
