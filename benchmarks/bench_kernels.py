"""Kernel micro-benchmarks: tree_attention, greedy_verify and compact_kv against PyTorch.

On a CUDA machine, `python benchmarks/bench_kernels.py --out benchmarks/results` measures
`triton.testing.do_bench` medians (warm-up, L2 flushed, two input sets alternated) at Llama-3-8B
shapes and writes `kernels.md`, `kernels.json` and `tree_attention_gbps.png`:
- tree_attention (32 query heads, 8 KV heads, head dim 128, bf16), T = 16, 32, 69, 128, prefix
  512 to 32768, batch 1, 8, 32: achieved GB/s on the K/V bytes against a device copy bandwidth
  measured in the same run, and the speed-up over PyTorch SDPA with a dense [T, prefix + T] mask
  (and over flash-attn's KV-cache kernel when installed: it has no tree mask, so it is a lower
  bound on time, not the same computation);
- greedy_verify at V = 128256, T = 69 against one torch.argmax over the same logits and against
  the PyTorch chain (`greedy_verify_reference`);
- compact_kv over 32 layers against the PyTorch reference.

On CPU, `pytest benchmarks/bench_kernels.py` runs the reference paths at small sizes through
pytest-benchmark (and the report writer at tiny sizes), so the harness itself is tested in CI.
`--quick --device cpu` runs the whole report on CPU at tiny sizes.
"""

import argparse
import functools
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from msn_kernels import (
    compact_kv,
    compact_kv_reference,
    greedy_verify,
    greedy_verify_reference,
    tree_attention,
    tree_attention_reference,
)


@dataclass(frozen=True)
class Shapes:
    """Benchmark sizes: Llama-3-8B on a GPU, tiny ones for a CPU smoke run."""

    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    nodes: tuple[int, ...]
    prefixes: tuple[int, ...]
    batches: tuple[int, ...]
    vocab: int
    verify_nodes: int
    layers: int


LLAMA3_8B = Shapes(
    q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, nodes=(16, 32, 69, 128),
    prefixes=(512, 1024, 2048, 4096, 8192, 16384, 32768), batches=(1, 8, 32), vocab=128256,
    verify_nodes=69, layers=32,
)  # fmt: skip
TINY = Shapes(4, 1, 16, torch.float32, (5,), (64, 128), (1,), 1000, 21, 2)


def random_parents(T: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, T)]


def ancestor_mask(parents: list[int], device: torch.device) -> torch.Tensor:
    """Bool [T, T]: mask[i, j] when j is on the root-to-i path."""
    mask = torch.eye(len(parents), dtype=torch.bool)
    for i in range(1, len(parents)):
        mask[i] |= mask[parents[i]]
    return mask.to(device)


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """do_bench median on CUDA (warm-up, L2 flushed between runs), wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture fn (after a warm-up on a side stream, which also compiles) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(calls: list[Callable[[], object]], device: torch.device, graph: bool = False):
    """Median ms of one call, cycling over the input sets so no single set stays cached.

    graph=True times CUDA-graph replays: the GPU time without Python and launch overhead, which
    dominates at batch 1 (a decode loop would capture its step in a graph too). Returns None when
    a baseline runs out of memory or cannot be captured.
    """
    try:
        if graph and device.type == "cuda":
            calls = [_cuda_graph(fn) for fn in calls]
        cycle = itertools.cycle(calls)
        return _median_ms(lambda: next(cycle)(), device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except RuntimeError as error:  # graph capture refused (a host sync inside, for instance)
        print(f"not timed: {error}", file=sys.stderr)
        return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def copy_bandwidth_gbs(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def attention_inputs(B, T, prefix, shapes, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    S = prefix + T
    q = torch.randn(B, shapes.q_heads, T, shapes.head_dim, device=device, dtype=shapes.dtype,
                    generator=gen)  # fmt: skip
    kv_shape = (B, shapes.kv_heads, S, shapes.head_dim)
    k = torch.randn(kv_shape, device=device, dtype=shapes.dtype, generator=gen)
    v = torch.randn(kv_shape, device=device, dtype=shapes.dtype, generator=gen)
    cache_lens = torch.full((B,), prefix, device=device, dtype=torch.int32)
    tree = ancestor_mask(random_parents(T, random.Random(seed)), device)
    dense = torch.ones(T, S, dtype=torch.bool, device=device)
    dense[:, prefix:] = tree  # (T, prefix + T): the mask SDPA needs
    return q, k, v, cache_lens, tree, dense


def bench_tree_attention(shapes: Shapes, device: torch.device, copy_gbs: float) -> list[dict]:
    """GB/s from graph replays; eager times (with launch overhead) alongside."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    rows = []
    for B in shapes.batches:
        for T in shapes.nodes:
            for prefix in shapes.prefixes:
                kv_elems = 2 * B * shapes.kv_heads * (prefix + T) * shapes.head_dim
                kv_bytes = kv_elems * shapes.dtype.itemsize
                n_sets = 2 if kv_bytes < 4 * 2**30 or device.type != "cuda" else 1
                sets = [attention_inputs(B, T, prefix, shapes, device, s) for s in range(n_sets)]
                ours = [lambda s=s: tree_attention(*s[:5], check_lens=False) for s in sets]
                sdpa = [
                    lambda s=s: F.scaled_dot_product_attention(
                        s[0], s[1], s[2], attn_mask=s[5], enable_gqa=True)
                    for s in sets
                ]  # fmt: skip
                row = {"batch": B, "nodes": T, "prefix": prefix,
                       "ours_ms": time_ms(ours, device, graph=True),
                       "ours_eager_ms": time_ms(ours, device),
                       "sdpa_ms": time_ms(sdpa, device, graph=True)}  # fmt: skip
                # enable_gqa with a mask only runs on SDPA's unfused math backend; with K/V
                # repeated to the query heads beforehand, the fused masked backends can run.
                row["sdpa_expanded_ms"] = _time_sdpa_expanded(sets, device)
                row["gbs"] = _ratio(kv_bytes / 1e6, row["ours_ms"])
                row["pct_copy"] = None if row["gbs"] is None else 100 * row["gbs"] / copy_gbs
                fastest_sdpa = min(
                    (t for t in (row["sdpa_ms"], row["sdpa_expanded_ms"]) if t is not None),
                    default=None,
                )
                row["speedup_sdpa"] = _ratio(fastest_sdpa, row["ours_ms"])
                if flash_attn_with_kvcache is not None and device.type == "cuda":
                    row["flash_attn_ms"] = _time_flash_attn(flash_attn_with_kvcache, sets, device)
                    row["speedup_flash_attn"] = _ratio(row["flash_attn_ms"], row["ours_ms"])
                rows.append(row)
                del sets, ours, sdpa
                print(json.dumps(row), flush=True)
    return rows


def _time_sdpa_expanded(sets: list, device: torch.device) -> float | None:
    """SDPA with K/V repeated to Hq heads outside the timed region; None if it does not fit."""
    try:
        expanded = []
        for q, k, v, _, _, dense in sets:
            group = q.shape[1] // k.shape[1]
            expanded.append(
                (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), dense)
            )  # (B, Hq, S, D) each
    except torch.OutOfMemoryError:
        return None
    calls = [
        lambda e=e: F.scaled_dot_product_attention(e[0], e[1], e[2], attn_mask=e[3])
        for e in expanded
    ]
    return time_ms(calls, device, graph=True)


def _time_flash_attn(flash_fn: Callable, sets: list, device: torch.device) -> float | None:
    """flash-attn's KV-cache kernel over prefix + T, without the tree mask (a lower bound)."""
    flash_sets = []
    for q, k, v, cache_lens, _, _ in sets:
        T = q.shape[2]
        flash_sets.append((q.transpose(1, 2).contiguous(),  # (B, T, Hq, D)
                           k.transpose(1, 2).contiguous(),  # (B, S, Hkv, D)
                           v.transpose(1, 2).contiguous(),  # (B, S, Hkv, D)
                           cache_lens + T))  # fmt: skip
    calls = [lambda f=f: flash_fn(f[0], f[1], f[2], cache_seqlens=f[3]) for f in flash_sets]
    return time_ms(calls, device, graph=True)


def bench_greedy_verify(shapes: Shapes, device: torch.device) -> list[dict]:
    """Graph replays (GPU time) and eager calls, against argmax and the PyTorch chain."""
    rows = []
    T, V = shapes.verify_nodes, shapes.vocab
    for B in (1, 8) if device.type == "cuda" else shapes.batches:
        sets = []
        for seed in range(2):
            gen = torch.Generator(device=device).manual_seed(seed)
            logits = torch.randn(B, T, V, device=device, dtype=shapes.dtype, generator=gen)
            parents = random_parents(T, random.Random(seed))
            tokens = logits.argmax(-1)[:, [max(p, 0) for p in parents]]  # every node matches
            sets.append((logits, tokens, parents))
        ours = [lambda s=s: greedy_verify(*s) for s in sets]
        argmax = [lambda s=s: s[0].argmax(-1) for s in sets]
        chain = [lambda s=s: greedy_verify_reference(*s) for s in sets]
        row = {"batch": B, "nodes": T, "vocab": V}
        for name, calls in (("ours", ours), ("argmax", argmax), ("chain", chain)):
            row[f"{name}_ms"] = time_ms(calls, device, graph=True)
            row[f"{name}_eager_ms"] = time_ms(calls, device)
        row["vs_argmax"] = _ratio(row["ours_ms"], row["argmax_ms"])
        row["vs_argmax_eager"] = _ratio(row["ours_eager_ms"], row["argmax_eager_ms"])
        row["speedup_chain"] = _ratio(row["chain_ms"], row["ours_ms"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_compact_kv(shapes: Shapes, device: torch.device) -> list[dict]:
    """All layers in one launch against the reference (eager: it reads lengths on the host)."""
    rows = []
    T, prefix, D = shapes.verify_nodes, shapes.prefixes[0], shapes.head_dim
    for B in shapes.batches:
        shape = (shapes.layers, B, shapes.kv_heads, prefix + T, D)
        k = torch.randn(shape, device=device, dtype=shapes.dtype)
        v = torch.randn(shape, device=device, dtype=shapes.dtype)
        cache_lens = torch.full((B,), prefix, device=device)
        accepted = torch.tensor([[0, 3, 9, 17, 30, -1]] * B, device=device).clamp(max=T - 1)
        args = (k, v, cache_lens, accepted)
        ours = [functools.partial(compact_kv, *args)]
        row = {
            "batch": B, "layers": shapes.layers,
            "ours_ms": time_ms(ours, device, graph=True),
            "ours_eager_ms": time_ms(ours, device),
            "reference_ms": time_ms([functools.partial(compact_kv_reference, *args)], device),
        }  # fmt: skip
        row["speedup_reference"] = _ratio(row["reference_ms"], row["ours_eager_ms"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else ("-" if x is None else str(x))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> None:
    """kernels.json, kernels.md and, when matplotlib is installed, tree_attention_gbps.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=1))
    text = [f"# Kernel benchmarks on {results['device']}\n",
            f"Command: `{results['command']}`\n",
            f"Copy bandwidth (read + write): {results['copy_gbs']:.1f} GB/s\n",
            "## tree_attention\n", _markdown_table(results["tree_attention"]),
            "## greedy_verify\n", _markdown_table(results["greedy_verify"]),
            "## compact_kv\n", _markdown_table(results["compact_kv"])]  # fmt: skip
    (out / "kernels.md").write_text("\n".join(text))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for row in results["tree_attention"]:
        series.setdefault((row["batch"], row["nodes"]), []).append((row["prefix"], row["gbs"]))
    for (batch, nodes), points in sorted(series.items()):
        ax.plot(*zip(*points, strict=True), marker="o", label=f"B={batch}, T={nodes}")
    ax.axhline(results["copy_gbs"], color="black", linestyle="--", label="copy bandwidth")
    ax.set(xscale="log", xlabel="prefix length", ylabel="GB/s (K/V bytes)",
           title=f"tree_attention on {results['device']}")  # fmt: skip
    ax.legend(fontsize="small")
    fig.savefig(out / "tree_attention_gbps.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Kernel micro-benchmarks (see module docstring)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = TINY if args.quick or device.type != "cuda" else LLAMA3_8B
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy_gbs = copy_bandwidth_gbs(device, 2**30 if device.type == "cuda" else 2**24)
    results = {
        "device": name,
        "command": " ".join(["python", "benchmarks/bench_kernels.py", *(argv or sys.argv[1:])]),
        "copy_gbs": copy_gbs,
        "tree_attention": bench_tree_attention(shapes, device, copy_gbs),
        "greedy_verify": bench_greedy_verify(shapes, device),
        "compact_kv": bench_compact_kv(shapes, device),
    }
    write_report(results, args.out)
    return results


# CPU benchmarks through pytest-benchmark: the reference paths at small sizes.


@pytest.fixture
def small_attention() -> tuple:
    return attention_inputs(2, 5, 128, TINY, torch.device("cpu"), seed=0)


def test_tree_attention_reference(benchmark, small_attention) -> None:
    q, k, v, cache_lens, tree, _ = small_attention
    benchmark(tree_attention_reference, q, k, v, cache_lens, tree)


def test_sdpa_dense_mask(benchmark, small_attention) -> None:
    q, k, v, _, _, dense = small_attention
    benchmark(F.scaled_dot_product_attention, q, k, v, attn_mask=dense, enable_gqa=True)


@pytest.mark.parametrize("method", ["chain", "argmax"])
def test_greedy_verify_reference(benchmark, method: str) -> None:
    logits = torch.randn(2, 21, 1000)
    parents = random_parents(21, random.Random(0))
    tokens = logits.argmax(-1)[:, [max(p, 0) for p in parents]]
    if method == "chain":
        benchmark(greedy_verify_reference, logits, tokens, parents)
    else:
        benchmark(torch.argmax, logits, -1)


def test_compact_kv_reference(benchmark) -> None:
    k = torch.randn(2, 2, 1, 64 + 21, 16)
    v = torch.randn_like(k)
    accepted = torch.tensor([[0, 3, 9, -1], [0, 1, -1, -1]])
    benchmark(compact_kv_reference, k, v, torch.tensor([64, 40]), accepted)


def test_report_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole report at tiny sizes with the PyTorch references."""
    monkeypatch.setenv("MSN_KERNELS", "torch")
    results = main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert results["tree_attention"] and results["greedy_verify"] and results["compact_kv"]
    assert (tmp_path / "kernels.md").read_text().startswith("# Kernel benchmarks on cpu")
    assert (tmp_path / "kernels.json").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tree_attention_gbps.png").stat().st_size > 0


if __name__ == "__main__":
    main()
