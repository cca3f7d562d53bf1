"""Cost of one CPU tree pass against its size T: msn's CPU path, without its kernel, the reference.

    python benchmarks/bench_step_cost.py [--model PATH] [--threads 1] [--prefix 250]

The CPU path is what `msn` runs by default: the few-row linear kernel
(`msn_kernels.few_row_linear`) up to 16 rows, oneDNN-prepacked linears beyond, and one
`scaled_dot_product_attention` call for the tree attention. `MSN_FEW_ROW_LINEAR=0` turns the
kernel off (oneDNN from 4 rows, `F.linear` below); `MSN_KERNELS=torch` switches everything off
(plain `F.linear`, the per-row reference attention; the rest of the model is shared). All three
run in one process on the same weights, interleaved per sample, so a load drift on a shared
machine hits them alike. Each sample is one forward over a chain of T tokens after
`--prefix` cached ones. Prints a table of medians and writes a PNG of both curves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import msn

SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
SWITCHES = ("MSN_KERNELS", "MSN_FEW_ROW_LINEAR")
# label -> the values of SWITCHES
PATHS = {"cpu path": ("", "1"), "no few-row kernel": ("", "0"), "reference": ("torch", "1")}


def time_pass(model, num_tokens: int, prefix: int, generator: torch.Generator) -> float:
    tokens = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator)
    cache_lens = torch.tensor([prefix])
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    start = time.perf_counter()
    with torch.no_grad():
        model(tokens, cache_lens=cache_lens, tree_mask=mask, max_cache_len=prefix)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint or GGUF (default: msn's default model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefix", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--plot", default="benchmarks/results/step_cost_cpu.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or msn.default_model_path()
    model = msn.load_model(path, dtype=torch.float32)
    model.setup_cache(1, args.prefix + max(SIZES))
    generator = torch.Generator().manual_seed(0)
    samples = {(label, t): [] for label in PATHS for t in SIZES}
    previous = {name: os.environ.get(name) for name in SWITCHES}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up (and packs the weights)
            for t in SIZES:
                for label, values in PATHS.items():
                    os.environ.update(zip(SWITCHES, values, strict=True))
                    seconds = time_pass(model, t, args.prefix, generator)
                    if round_:
                        samples[label, t].append(seconds)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    ms = {key: 1e3 * statistics.median(values) for key, values in samples.items()}
    print(f"{model.config.num_layers} layers, float32, {args.threads} thread(s), prefix "
          f"{args.prefix}, median of {args.rounds} interleaved rounds, ms per forward")  # fmt: skip
    print("| T | " + " | ".join(PATHS) + " | cpu path vs T = 1 |")
    print("|---:|" + "---:|" * (len(PATHS) + 1))
    for t in SIZES:
        cells = " | ".join(f"{ms[label, t]:.1f}" for label in PATHS)
        print(f"| {t} | {cells} | {ms['cpu path', t] / ms['cpu path', 1]:.2f}x |")
    if args.plot:
        plot(ms, args)


def plot(ms: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in PATHS:
        ax.plot(SIZES, [ms[label, t] for t in SIZES], marker="o", label=label)
    ax.set_xlabel("tree tokens T in the pass")
    ax.set_ylabel("ms per forward")
    ax.set_title(f"CPU tree pass, {args.threads} thread(s), {args.prefix}-token prefix")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
