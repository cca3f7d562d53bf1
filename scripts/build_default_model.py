"""Rebuild the embedded default model, `msn/assets/default-model/`, from scratch on a CPU.

    python scripts/build_default_model.py                       # the shipped MSN model
    python scripts/build_default_model.py --no-noise --output runs/plain-twin \
        --base /tmp/msn-default-model-build/base    # the plain twin, same base and data
    python scripts/build_default_model.py --scale 0.05 --output /tmp/smoke   # quick smoke run

Everything is offline and seeded:
  1. Corpus: the top-level `.py` modules of this Python's standard library, sorted by name;
     every 8th file is held out for evaluation. Files become (a) a token stream for
     pretraining and (b) prompt/continuation pairs of consecutive lines, written as JSONL.
  2. Tokenizer: byte-level BPE (2048 tokens) trained with `tokenizers` on the training files,
     with special tokens and a chat template, saved as a transformers tokenizer.
  3. Pretraining: a ~2.8M-parameter Llama (GQA, 512-token context) from random weights, on
     random windows of the token stream.
  4. Fine-tuning through `msn train` (the same code path users run) on the pairs, with MSN
     noise (or without, for the plain twin); a quarter of the pairs are chats, so the chat
     template works too.
  5. Export in bf16 with the tokenizer, a model card and `build_info.json` recording the
     Python version, a hash of the corpus files, the settings, the losses and the CPU time.

The intermediate files (corpus JSONL, pretrained base, checkpoints) go to --workdir and are not
part of the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import msn.train
from msn.data import train_byte_level_bpe

REPO = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HOLDOUT_EVERY = 8  # file i is held out when i % 8 == 7
PAIR_CHARS = 900  # lines are grouped into chunks of about this many characters
PROMPT_SHARE = 0.3  # the first ~30% of a chunk's characters are the prompt
CHAT_EVERY = 4  # every 4th training pair is written as a chat
EVAL_PAIRS = 96  # evenly spaced held-out pairs for the held-out loss of the fine-tune


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "msn/assets/default-model"))
    parser.add_argument("--workdir", default="/tmp/msn-default-model-build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies all step counts")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--no-noise", action="store_true", help="plain fine-tune (the twin)")
    parser.add_argument("--noise-len", type=int, default=5)
    parser.add_argument(
        "--spans",
        type=int,
        default=8,
        help="noise spans per example: ~8 per 256 tokens, the density that "
        "showed the MSN effect at this scale in DESIGN.md (the paper uses 1)",
    )
    # On a shared 2-core machine one thread measured 2-5x faster per step than two (threads
    # spin-waiting on busy cores); use 2 on an idle machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--base",
        help="skip pretraining and fine-tune this earlier build's WORKDIR/base, e.g. for the "
        "--no-noise twin of a build",
    )
    parser.add_argument(
        "--corpus-only", action="store_true", help="write the corpus JSONL to --workdir and stop"
    )
    return parser.parse_args()


# 1. Corpus ---------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's top-level modules, in a fixed order."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def split_pairs(text: str) -> list[dict[str, str]]:
    """Prompt/continuation pairs from consecutive lines: chunks of ~PAIR_CHARS characters."""
    pairs, chunk = [], []
    for line in text.splitlines(keepends=True) + [None]:
        if line is not None:
            chunk.append(line)
        if chunk and (line is None or sum(map(len, chunk)) >= PAIR_CHARS):
            total, cut = sum(map(len, chunk)), 1
            while cut < len(chunk) - 1 and sum(map(len, chunk[:cut])) < PROMPT_SHARE * total:
                cut += 1
            prompt, response = "".join(chunk[:cut]), "".join(chunk[cut:])
            if prompt.strip() and response.strip():
                pairs.append({"prompt": prompt, "response": response})
            chunk = []
    return pairs


def build_corpus(workdir: Path) -> dict:
    """Write train.jsonl / heldout.jsonl and return what was used."""
    files = stdlib_files()
    train_files = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    heldout_files = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    train_pairs = [p for f in train_files for p in split_pairs(read_source(f))]
    heldout_pairs = [p for f in heldout_files for p in split_pairs(read_source(f))]
    with open(workdir / "train.jsonl", "w", encoding="utf-8") as out:
        for i, pair in enumerate(train_pairs):
            if i % CHAT_EVERY == CHAT_EVERY - 1:
                pair = {
                    "messages": [
                        {"role": "user", "content": pair["prompt"]},
                        {"role": "assistant", "content": pair["response"]},
                    ]
                }
            out.write(json.dumps(pair) + "\n")
    with open(workdir / "heldout.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(pair) + "\n" for pair in heldout_pairs)
    step = max(1, len(heldout_pairs) // EVAL_PAIRS)
    with open(workdir / "heldout-eval.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(pair) + "\n" for pair in heldout_pairs[::step][:EVAL_PAIRS])
    return {
        "source": f"top-level *.py of {sysconfig.get_paths()['stdlib']} (Python "
        f"{platform.python_version()})",
        "files": len(files),
        "files_sha256": digest.hexdigest(),
        "heldout_rule": f"sorted by name, file i held out when i % {HOLDOUT_EVERY} == "
        f"{HOLDOUT_EVERY - 1}",
        "heldout_files": [f.name for f in heldout_files],
        "train_chars": sum(len(read_source(f)) for f in train_files),
        "train_pairs": len(train_pairs),
        "heldout_pairs": len(heldout_pairs),
        "train_files": train_files,
        "heldout_paths": heldout_files,
    }


# 2. Tokenizer ------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    backend = train_byte_level_bpe(texts, vocab_size, SPECIAL_TOKENS)
    # tokenizer(text) starts with <|bos|>, as training examples do.
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# 3. Pretraining ----------------------------------------------------------------------------


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=6,  # head_dim 32
        num_key_value_heads=2,  # GQA, 3 query heads per KV head
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> torch.Tensor:
    """All files as one stream of <|bos|> file <|end|>."""
    ids: list[int] = []
    for f in files:
        ids += [tokenizer.bos_token_id]
        ids += tokenizer.backend_tokenizer.encode(read_source(f), add_special_tokens=False).ids
        ids += [tokenizer.eos_token_id]
    return torch.tensor(ids)


def pretrain(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    heldout: torch.Tensor,
    steps: int,
    log: Callable[[str], None],
    batch_size: int = 8,
    block: int = 256,
    lr: float = 3e-3,
    warmup: int = 20,
) -> tuple[list[float], float]:
    """Plain next-token training on random windows; returns (losses, held-out loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    losses = []
    model.train()
    for step in range(steps):
        # Linear warm-up, then cosine decay to 10% of the peak.
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(stream) - block - 1, (batch_size,))
        x = torch.stack([stream[s : s + block] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps} loss {loss.item():.4f} lr {lr * scale:.2e}")
    return losses, heldout_loss(model, heldout, block)


@torch.no_grad()
def heldout_loss(
    model: LlamaForCausalLM, stream: torch.Tensor, block: int = 256, windows: int = 32
) -> float:
    """Mean loss over evenly spaced windows of the held-out stream."""
    model.eval()
    starts = torch.linspace(0, len(stream) - block - 1, windows).long().tolist()
    x = torch.stack([stream[s : s + block] for s in starts])  # (windows, T)
    return sum(
        model(input_ids=x[i : i + 8], labels=x[i : i + 8]).loss.item() for i in range(0, windows, 8)
    ) / math.ceil(windows / 8)


# 5. Export ---------------------------------------------------------------------------------


MODEL_CARD = """# msn default model

A tiny Llama-architecture model (~{params:.2f}M parameters) that `msn` ships so that
`msn generate` and `msn bench` work offline with no download. It continues Python code; it is
a demonstration model, not a useful assistant.

- **Built by** `scripts/build_default_model.py` (seed {seed}); rerun it to rebuild from scratch.
- **Data**: {source}: {files} files (sha256 of names+contents `{files_sha256}`); held out:
  {heldout_rule} ({heldout_count} files). {train_pairs} training pairs of consecutive lines
  (~30% prompt, rest continuation; every 4th written as a chat), {heldout_pairs} held-out
  ({eval_pairs} evenly spaced ones give the held-out loss below).
- **Tokenizer**: byte-level BPE, {vocab} tokens, trained with `tokenizers` on the training
  files; special tokens {special}; chat template `{template}`.
- **Architecture**: hidden {hidden}, {layers} layers, {heads} heads / {kv_heads} KV heads
  (GQA), MLP {inter}, context {context}, tied embeddings, weights stored in bf16.
- **Pretraining**{reused}: {pretrain[steps]} steps of 8 x 256-token windows, AdamW lr 3e-3
  cosine; loss {pretrain[first_loss]:.3f} -> {pretrain[last10_loss]:.3f} (mean of last 10
  steps); held-out loss {pretrain[heldout_loss]:.3f}; {pretrain[cpu_seconds]:.0f} s CPU.
- **Fine-tuning** through `msn train`: {finetune_steps} steps, batch 8, lr 1e-3 cosine,
  {noise}; train loss {ft_loss:.3f}; held-out loss (clean inputs) {ft_heldout:.3f}.
- **Cost** of this build: {cpu:.0f} s CPU time ({wall:.0f} s wall) on {threads} thread(s) of
  {machine}; Python {python}, torch {torch}, transformers {transformers},
  tokenizers {tokenizers}.

Usage: `msn generate --prompt "def fib(n):"` (add `--chat` for the chat template), or load
the directory with `transformers.AutoModelForCausalLM.from_pretrained` / `msn.load_model`.
"""


def main() -> None:
    args = parse_args()
    start_wall, start_cpu = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    workdir, output = Path(args.workdir), Path(args.output)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        cpu, wall = time.process_time() - start_cpu, time.time() - start_wall
        print(f"[{wall:7.1f}s wall {cpu:7.1f}s cpu] {message}", flush=True)

    # 1. Corpus.
    corpus = build_corpus(workdir)
    log(
        f"corpus: {corpus['files']} files, {corpus['train_pairs']} train pairs, "
        f"{corpus['heldout_pairs']} held-out pairs in {workdir}"
    )
    if args.corpus_only:
        return

    # 2-3. Tokenizer and pretraining from scratch, or an earlier build's base (the twin).
    if args.base:
        base = Path(args.base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        if not (base / "pretrain.json").is_file():
            raise ValueError(f"--base {base}: no pretrain.json; pass the WORKDIR/base of a build")
        pretraining = json.loads((base / "pretrain.json").read_text())
        log(f"using the pretrained base {base}")
    else:
        base = workdir / "base"
        tokenizer = train_tokenizer([read_source(f) for f in corpus["train_files"]])
        log(f"tokenizer: {len(tokenizer)} tokens")
        stream = token_stream(tokenizer, corpus["train_files"])
        heldout = token_stream(tokenizer, corpus["heldout_paths"])
        log(f"pretraining stream {len(stream)} tokens, held-out {len(heldout)} tokens")
        model = LlamaForCausalLM(model_config(tokenizer))
        log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        steps = max(1, round(args.pretrain_steps * args.scale))
        losses, pre_heldout = pretrain(model, stream, heldout, steps, log)
        log(f"pretraining done: held-out loss {pre_heldout:.4f}")
        pretraining = {
            "steps": steps,
            "batch": 8,
            "block": 256,
            "lr": 3e-3,
            "first_loss": losses[0],
            "last10_loss": sum(losses[-10:]) / len(losses[-10:]),
            "heldout_loss": pre_heldout,
            "cpu_seconds": round(time.process_time() - start_cpu, 1),
        }
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        (base / "pretrain.json").write_text(json.dumps(pretraining, indent=2) + "\n")

    # 4. Fine-tuning with MSN noise, through the `msn train` code path.
    finetune_steps = max(1, round(args.finetune_steps * args.scale))
    finetuned = workdir / ("finetune-plain" if args.no_noise else "finetune-msn")
    parser = argparse.ArgumentParser()
    msn.train.add_arguments(parser)
    train_args = parser.parse_args([
        "--model", str(base), "--data", str(workdir / "train.jsonl"),
        "--eval-data", str(workdir / "heldout-eval.jsonl"), "--output", str(finetuned),
        "--pair-format", "plain", "--max-length", "512", "--max-steps", str(finetune_steps),
        "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "10", "--weight-decay", "0.1",
        "--noise-len", str(args.noise_len), "--spans", str(args.spans),
        "--seed", str(args.seed), "--logging-steps", "10", "--save-steps", "100000",
        *(["--no-noise"] if args.no_noise else []),
    ])  # fmt: skip
    summary = msn.train.train(train_args)
    log(
        f"fine-tuning done: train loss {summary['train_loss']:.4f}, "
        f"held-out loss {summary['eval_loss']:.4f}"
    )

    # 5. Export: bf16 weights, tokenizer, model card and build record.
    output.mkdir(parents=True, exist_ok=True)
    final = LlamaForCausalLM.from_pretrained(finetuned, dtype=torch.bfloat16)
    final.save_pretrained(output)
    tokenizer.save_pretrained(output)
    cpu, wall = time.process_time() - start_cpu, time.time() - start_wall
    noise = (
        "no noise (plain fine-tune)"
        if args.no_noise
        else f"MSN noise: {args.spans} span(s) of {args.noise_len} tokens per example"
    )
    record = {
        "seed": args.seed,
        "scale": args.scale,
        "corpus": {k: v for k, v in corpus.items() if k not in ("train_files", "heldout_paths")},
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "special_tokens": SPECIAL_TOKENS,
            "chat_template": CHAT_TEMPLATE,
        },
        "parameters": final.num_parameters(),
        "pretrain": {**pretraining, "base": str(base), "reused": bool(args.base)},
        "finetune": {
            "steps": finetune_steps,
            "noise": noise,
            "train_loss": summary["train_loss"],
            "heldout_loss": summary["eval_loss"],
            "loss_history": summary["loss_history"],
        },
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (output / "build_info.json").write_text(json.dumps(record, indent=2) + "\n")
    config = final.config
    (output / "README.md").write_text(
        MODEL_CARD.format(
            params=record["parameters"] / 1e6,
            seed=args.seed,
            **{k: corpus[k] for k in ("source", "files", "files_sha256", "heldout_rule")},
            heldout_count=len(corpus["heldout_files"]),
            train_pairs=corpus["train_pairs"],
            heldout_pairs=corpus["heldout_pairs"],
            eval_pairs=EVAL_PAIRS,
            vocab=len(tokenizer),
            special=", ".join(f"`{t}`" for t in SPECIAL_TOKENS),
            template=CHAT_TEMPLATE,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            inter=config.intermediate_size,
            context=config.max_position_embeddings,
            pretrain=pretraining,
            reused=f" (reused from `{base}`)" if args.base else "",
            finetune_steps=finetune_steps,
            noise=noise,
            ft_loss=summary["train_loss"],
            ft_heldout=summary["eval_loss"],
            cpu=cpu,
            wall=wall,
            threads=args.threads,
            machine=f"{platform.machine()} {platform.processor() or 'CPU'}",
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            tokenizers=tokenizers.__version__,
        )
    )
    size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    log(f"wrote {output} ({size / 1e6:.1f} MB); total {cpu:.0f} s CPU, {wall:.0f} s wall")


if __name__ == "__main__":
    main()
