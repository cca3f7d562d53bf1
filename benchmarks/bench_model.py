"""The slim model against transformers' LlamaForCausalLM, side by side on the CPU.

Same random weights (~100M parameters), same thread count, one process: load time, prefill
tokens/s and the latency of a one-token decode step over a cached prefix, as medians, with
the ratios msn/transformers. Target: msn's decode step at least as fast as transformers eager.

    python benchmarks/bench_model.py [--threads 2] [--prefill 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import msn

CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=500000.0,
)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_transformers(path: str, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    load = median_seconds(lambda: LlamaForCausalLM.from_pretrained(path), 3)
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    token = prompt[:, -1:]

    def prefill():
        with torch.no_grad():
            return model(prompt, use_cache=True)

    prefill_time = median_seconds(prefill, repeats)
    prefill_cache = prefill().past_key_values
    step = median_seconds(lambda: _hf_step(model, token, prefill_cache), repeats)
    return {
        "load_s": load,
        "prefill_tok_s": prompt.shape[1] / prefill_time,
        "decode_ms": 1e3 * step,
    }


def _hf_step(model, token, cache) -> None:
    with torch.no_grad():
        model(token, past_key_values=cache, use_cache=True)
    cache.crop(-1)  # back to the prefix, so every step sees the same length


def bench_msn(path: str, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    load = median_seconds(lambda: msn.load_model(path, max_seq_len=1024), 3)
    model = msn.load_model(path, max_seq_len=1024)
    model.setup_cache(1, 1024)
    prefix_len = torch.tensor([prompt.shape[1]])
    token = prompt[:, -1:]
    with torch.no_grad():
        prefill_time = median_seconds(lambda: model(prompt), repeats)
        step = median_seconds(lambda: model(token, cache_lens=prefix_len), repeats)
    return {
        "load_s": load,
        "prefill_tok_s": prompt.shape[1] / prefill_time,
        "decode_ms": 1e3 * step,
    }


def test_harness_on_a_tiny_model(tmp_path):
    """CI runs the timing code once on a tiny model, so the script keeps working."""
    small = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2)
    LlamaForCausalLM(LlamaConfig(**{**CONFIG, **small})).save_pretrained(tmp_path)
    prompt = torch.randint(0, 256, (1, 16))
    for measure in (bench_transformers, bench_msn):
        figures = measure(str(tmp_path), prompt, repeats=1)
        assert all(value > 0 for value in figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        reference = LlamaForCausalLM(LlamaConfig(**CONFIG))
        parameters = sum(p.numel() for p in reference.parameters())
        reference.save_pretrained(path)
        del reference
        prompt = torch.randint(0, CONFIG["vocab_size"], (1, args.prefill))
        hf = bench_transformers(path, prompt, args.repeats)
        ours = bench_msn(path, prompt, args.repeats)
    print(
        f"{parameters / 1e6:.0f}M parameters, fp32, {args.threads} threads, "
        f"prefill {args.prefill} tokens, torch {torch.__version__}\n"
    )
    print("| metric | transformers (eager) | msn | msn / transformers |\n|---|---|---|---|")
    rows = [
        ("load (s, lower is better)", "load_s", lambda a, b: a / b),
        ("prefill tokens/s (higher is better)", "prefill_tok_s", lambda a, b: a / b),
        ("decode step ms (lower is better)", "decode_ms", lambda a, b: a / b),
    ]
    for label, key, ratio in rows:
        print(f"| {label} | {hf[key]:.3f} | {ours[key]:.3f} | {ratio(ours[key], hf[key]):.2f} |")
    speedup = hf["decode_ms"] / ours["decode_ms"]
    print(f"\ndecode-step speed-up of msn over transformers: {speedup:.2f}x")


if __name__ == "__main__":
    main()
