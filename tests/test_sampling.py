"""Lossless sampling: every method draws exactly from plain ancestral sampling's distribution.

- The filters equal transformers' warpers (temperature, then top-k, then top-p).
- Chi-square tests of the joint distribution of three new tokens against the exact one, for
  greedy (plain) sampling, jacobi and tr-jacobi, at temperatures 0.7 and 1.3, with top-k and
  with top-p, and on a model whose drafts are accepted often. A block model makes this cheap:
  its next-token distribution depends only on the tokens since the last multiple of three, so
  one long generate call yields a thousand independent 3-token samples (block 0 is the first
  three new tokens), with the decoders' drafts (retrieval, Jacobi) accepted across blocks.
- The same on a real tiny Llama (first two new tokens, exact distribution from transformers).
- Draws are keyed by position, so every method emits the same tokens for the same seed.

All seeds are fixed: the tests are deterministic.
"""

import itertools
import json
from collections import Counter

import pytest
import torch
from conftest import save_tiny_llama
from scripted_model import ScriptedModel
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import msn
from msn.acceptance import AcceptanceStats
from msn.latency import LatencyProfile
from msn.sampling import Sampler, SamplingConfig, filter_logits, make_sampler, position_seed
from msn.tree import comb_tree

BLOCK = 3
P_MIN = 1e-3  # deterministic seeds: a pass is a pass for good; a bias gives p < 1e-10


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Transformers' own warpers, in its order: the distribution plain sampling draws from."""
    scores = logits.reshape(-1, logits.shape[-1])
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1).reshape(logits.shape)


def chi_square_p(counts: Counter, probs: dict, total: int) -> float:
    """p-value of a chi-square test; cells expected below 5 are pooled into one."""
    impossible = [cell for cell in counts if probs.get(cell, 0.0) == 0.0]
    assert not impossible, f"drew cells the filters exclude: {impossible[:5]}"
    stat, df, pooled_expected, pooled_count = 0.0, -1, 0.0, 0
    for cell, p in probs.items():
        expected = total * p
        if expected < 5:
            pooled_expected += expected
            pooled_count += counts.get(cell, 0)
        else:
            stat += (counts.get(cell, 0) - expected) ** 2 / expected
            df += 1
    if pooled_expected > 0:
        stat += (pooled_count - pooled_expected) ** 2 / pooled_expected
        df += 1
    assert df >= 5, "too few cells for the test to mean anything"
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


# -- the filters and the sampler ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7),
        dict(top_k=5),
        dict(top_p=0.8),
        dict(temperature=1.3, top_k=7, top_p=0.9),
        dict(top_k=1),
        dict(top_p=0.0),
        dict(top_k=500),
    ],
)
def test_filters_match_transformers(options):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    logits[0, 10:14] = logits[0].max()  # ties with the k-th score are kept
    ours = filter_logits(logits, SamplingConfig(**options)).softmax(dim=-1)
    torch.testing.assert_close(ours, reference_probs(logits, **options), rtol=0, atol=1e-15)


def test_sampler_noise_depends_on_seed_and_position_only():
    sampler = Sampler(SamplingConfig(), seed=5, device="cpu")
    rows = sampler.noise(10, 4, 32, torch.float32)  # positions 10..13
    again = Sampler(SamplingConfig(), seed=5, device="cpu").noise(12, 3, 32, torch.float32)
    assert torch.equal(rows[2:], again[:2])  # position 12 and 13, asked in another order
    other = Sampler(SamplingConfig(), seed=6, device="cpu").noise(10, 1, 32, torch.float32)
    assert not torch.equal(rows[0], other[0])
    assert len({position_seed(s, p) for s in range(50) for p in range(200)}) == 50 * 200
    # A tree's nodes read their depth's row: perturb(logits, p, depths) == logits + G[p + d].
    logits = torch.randn(1, 5, 32)
    depths = torch.tensor([0, 1, 1, 2, 3])
    perturbed = sampler.perturb(logits, 10, depths, max_depth=3)
    torch.testing.assert_close(perturbed[0], logits[0] + rows[depths], rtol=0, atol=0)


def test_bad_sampling_options_are_refused():
    with pytest.raises(ValueError, match="temperature must be a number > 0.*do_sample=False"):
        make_sampler(True, 0.0, 0, 1.0, None, "cpu")
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        make_sampler(True, 1.0, -1, 1.0, None, "cpu")
    with pytest.raises(ValueError, match="top_k must be an int"):
        make_sampler(True, 1.0, 2.5, 1.0, None, "cpu")
    with pytest.raises(ValueError, match="top_p must be a number in"):
        make_sampler(True, 1.0, 0, 1.5, None, "cpu")
    with pytest.raises(ValueError, match="do_sample must be True or False"):
        make_sampler("yes", 1.0, 0, 1.0, None, "cpu")
    with pytest.raises(ValueError, match="seed must be an int or None"):
        make_sampler(True, 1.0, 0, 1.0, "7", "cpu")
    assert make_sampler(False, 0.0, -1, 5.0, None, "cpu") is None  # greedy reads none of them


# -- a block model: one generate call, many independent 3-token samples ----------------------


class BlockModel(ScriptedModel):
    """Random logits that depend only on the tokens since the last multiple of BLOCK.

    The token at position n is drawn given the tokens at positions [n - n % 3, n): blocks of
    three positions are independent samples of one 3-token distribution.
    """

    def __init__(self, vocab_size=6, scale=1.5, seed=0, max_seq_len=8192):
        super().__init__(lambda context: 0, vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.scale, self.seed, self.table = scale, seed, {}

    def block_logits(self, block: tuple[int, ...]) -> torch.Tensor:
        if block not in self.table:
            key = hash((self.seed, *block)) % 2**62
            generator = torch.Generator().manual_seed(key)
            noise = torch.randn(self.config.vocab_size, generator=generator, dtype=torch.float64)
            self.table[block] = self.scale * noise
        return self.table[block]

    def __call__(
        self, tokens, positions=None, cache_lens=None, tree_mask=None, last_only=False,
        max_cache_len=None,
    ):  # fmt: skip
        self.forward_calls += 1
        row = tokens[0].tolist()
        start = 0 if cache_lens is None else int(cache_lens[0])
        self.slots[start : start + len(row)] = row
        if tree_mask is None:
            tree_mask = torch.ones(len(row), len(row), dtype=torch.bool).tril()
        nodes = range(len(row)) if not last_only else [len(row) - 1]
        out = []
        for i in nodes:
            path = [row[j] for j in tree_mask[i].nonzero().flatten().tolist()]
            n = start + len(path)  # position of the token these logits predict
            k = n % BLOCK
            tail = path[-k:] if k <= len(path) else self.slots[n - k : start] + path
            out.append(self.block_logits(tuple(tail[-k:]) if k else ()))
        return torch.stack(out)[None]

    def block_probs(self, config: dict) -> dict[tuple[int, ...], float]:
        """The exact distribution of one block of three tokens, from transformers' warpers."""
        vocab = range(self.config.vocab_size)
        first = reference_probs(self.block_logits(()), **config)
        probs = {}
        for a in vocab:
            second = reference_probs(self.block_logits((a,)), **config)
            for b in vocab:
                third = reference_probs(self.block_logits((a, b)), **config)
                for c in vocab:
                    probs[a, b, c] = float(first[a] * second[b] * third[c])
        return probs


SAMPLES = 2000  # blocks per generate call
REAL_SAMPLES = 1500  # generate calls
CONFIGS = {
    "t0.7": dict(temperature=0.7),
    "t1.3": dict(temperature=1.3),
    "top-k": dict(top_k=3),
    "top-p": dict(top_p=0.8),
}
METHODS = {
    "greedy": dict(method="greedy"),
    "jacobi": dict(method="jacobi"),
    "tr-jacobi": dict(method="tr-jacobi"),  # the auto tree
    "tr-jacobi-comb": dict(method="tr-jacobi", tree=comb_tree([3, 2, 1], retrieval_depth=4)),
}


def sample_blocks(model, method_options, config, seed, samples=SAMPLES):
    if method_options.get("tree") is None and method_options["method"] == "tr-jacobi":
        method_options = dict(method_options, acceptance=AcceptanceStats())
    prompt = [0, 1, 2] * 4  # a multiple of BLOCK: new tokens start a block
    result = msn.generate(
        model, prompt, BLOCK * samples, eos_token_id=[], do_sample=True, seed=seed,
        **method_options, **config,
    )  # fmt: skip
    new = result.output_ids[0, len(prompt) :].tolist()
    assert len(new) == BLOCK * samples
    blocks = Counter(tuple(new[i : i + BLOCK]) for i in range(0, len(new), BLOCK))
    return blocks, result


@pytest.fixture(autouse=True)
def _pytorch_kernels(monkeypatch):
    """The PyTorch references (float64 logits take them anyway); the kernels have own tests."""
    monkeypatch.setenv("MSN_KERNELS", "torch")


# Every configuration for each method; the fixed tree once (the auto tree runs them all).
CASES = [(m, c) for m in ("greedy", "jacobi", "tr-jacobi") for c in CONFIGS]
CASES.append(("tr-jacobi-comb", "t1.3"))


@pytest.mark.parametrize(("method", "config_name"), CASES)
def test_joint_distribution_of_three_tokens(method, config_name):
    model = BlockModel(seed=1)
    config = CONFIGS[config_name]
    blocks, result = sample_blocks(model, METHODS[method], config, seed=11)
    p = chi_square_p(blocks, model.block_probs(config), SAMPLES)
    assert p > P_MIN, (method, config_name, p)
    if method != "greedy":
        assert result.tokens_per_step > 1.05, "the drafts were never accepted"


@pytest.mark.parametrize("method", ["greedy", "jacobi", "tr-jacobi"])
def test_joint_distribution_when_drafts_are_accepted_often(method):
    """A peaked model repeats itself: retrieval and Jacobi drafts are accepted most steps."""
    model = BlockModel(scale=3.0, seed=2)
    config = dict(temperature=0.9, top_p=0.95)
    blocks, result = sample_blocks(model, METHODS[method], config, seed=3)
    probs = model.block_probs(config)
    assert chi_square_p(blocks, probs, SAMPLES) > P_MIN
    if method != "greedy":
        assert result.tokens_per_step > 1.8, result.tokens_per_step
        assert max(result.accept_lengths) >= 4
    # The test has power: the same draws are far from the untempered distribution.
    assert chi_square_p(blocks, model.block_probs({}), SAMPLES) < 1e-10


# -- a real tiny Llama --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory):
    """A one-layer Llama, vocabulary 8, with a sharpened head (far from uniform)."""
    path = tmp_path_factory.mktemp("sampling-llama")
    hf = save_tiny_llama(
        path, vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, seed=3,
    )  # fmt: skip
    with torch.no_grad():
        hf.lm_head.weight.mul_(12.0)
    hf.save_pretrained(path)
    return msn.load_model(path, dtype=torch.float64), LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float64
    )


def test_real_model_first_three_tokens(peaked_llama):
    model, hf = peaked_llama
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    config = dict(temperature=1.3, top_k=6)
    latency = LatencyProfile.synthetic(0.01, 8, 0.001)
    counts, first_steps = Counter(), Counter()
    for seed in range(REAL_SAMPLES):
        result = msn.generate(
            model, prompt, 3, method="tr-jacobi", eos_token_id=[], do_sample=True, seed=seed,
            latency=latency, acceptance=AcceptanceStats(), **config,
        )  # fmt: skip
        counts[tuple(result.output_ids[0, len(prompt) :].tolist())] += 1
        first_steps[result.accept_lengths[0]] += 1
    vocab = range(8)
    with torch.no_grad():  # the exact distribution, from transformers' model and warpers
        first = reference_probs(hf(torch.tensor([prompt])).logits[0, -1], **config)
        pairs = list(itertools.product(vocab, repeat=2))
        second = reference_probs(
            hf(torch.tensor([prompt + [a] for a in vocab])).logits[:, -1], **config
        )
        third = reference_probs(
            hf(torch.tensor([prompt + list(ab) for ab in pairs])).logits[:, -1], **config
        )
    probs = {
        (a, b, c): float(first[a] * second[a, b] * third[i, c])
        for i, (a, b) in enumerate(pairs)
        for c in vocab
    }
    assert chi_square_p(counts, probs, REAL_SAMPLES) > P_MIN
    assert first_steps[2] > REAL_SAMPLES // 10, f"first steps rarely accepted: {first_steps}"


@pytest.mark.parametrize("seed", [0, 1])
def test_same_seed_same_tokens_with_every_method(peaked_llama, seed, monkeypatch):
    monkeypatch.delenv("MSN_KERNELS")  # the kernels as generate runs them
    model, _ = peaked_llama
    prompt = [1, 2, 3, 1, 2]
    options = dict(eos_token_id=[], do_sample=True, seed=seed, temperature=0.8, top_p=0.95)
    greedy = msn.generate(model, prompt, 30, method="greedy", **options)
    for method_options in (
        dict(method="jacobi"),
        dict(method="tr-jacobi", acceptance=AcceptanceStats()),
        dict(method="tr-jacobi", tree=comb_tree([4, 2, 1], retrieval_depth=3)),
        dict(method="tr-jacobi", tree="chain:3", retrieval=False),
    ):
        result = msn.generate(model, prompt, 30, **method_options, **options)
        assert torch.equal(result.output_ids, greedy.output_ids), method_options
        again = msn.generate(model, prompt, 30, **method_options, **options)
        assert torch.equal(again.output_ids, result.output_ids)
    other = msn.generate(model, prompt, 30, method="greedy", **{**options, "seed": seed + 7})
    assert greedy.sampling == dict(temperature=0.8, top_k=0, top_p=0.95, seed=seed)
    assert not torch.equal(other.output_ids, greedy.output_ids)


def test_seed_none_follows_torch_manual_seed(peaked_llama):
    model, _ = peaked_llama
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        result = msn.generate(
            model, [1, 2, 3], 20, method="jacobi", eos_token_id=[], do_sample=True
        )
        outputs.append(result.output_ids)
    assert torch.equal(*outputs)
    again = msn.generate(
        model, [1, 2, 3], 20, method="greedy", eos_token_id=[], do_sample=True,
        seed=result.sampling["seed"],
    )  # fmt: skip
    assert torch.equal(again.output_ids, result.output_ids)  # the reported seed repeats it


def test_greedy_is_unchanged_by_sampling_options(peaked_llama):
    model, _ = peaked_llama
    plain = msn.generate(model, [1, 2, 3], 20, method="tr-jacobi", eos_token_id=[])
    ignored = msn.generate(
        model, [1, 2, 3], 20, method="tr-jacobi", eos_token_id=[], temperature=0.5, top_k=2
    )
    assert torch.equal(plain.output_ids, ignored.output_ids)
    argmax = msn.generate(model, [1, 2, 3], 20, method="greedy", eos_token_id=[])
    assert torch.equal(plain.output_ids, argmax.output_ids)
    assert plain.sampling is None


def test_sampled_verification_through_the_triton_kernel(monkeypatch):
    """float32 logits under TRITON_INTERPRET take greedy_verify's kernel: same tokens."""

    class Float32Blocks(BlockModel):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs).float()

    options = dict(method="tr-jacobi", tree=comb_tree([3, 2, 1], retrieval_depth=4))
    torch_blocks, _ = sample_blocks(Float32Blocks(seed=4), options, {}, seed=5, samples=20)
    monkeypatch.delenv("MSN_KERNELS")
    kernel_blocks, _ = sample_blocks(Float32Blocks(seed=4), options, {}, seed=5, samples=20)
    assert kernel_blocks == torch_blocks


# -- command line --------------------------------------------------------------------------------


def test_cli_generate_samples_reproducibly(tiny_checkpoint, capsys):
    from msn.cli import main

    def run(*extra):
        code = main([
            "generate", "--model", str(tiny_checkpoint), "--prompt", "def add(a, b):",
            "--max-new-tokens", "10", "--json", "--dtype", "float64", *extra,
        ])  # fmt: skip
        assert code == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    flags = ["--do-sample", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]
    first = run(*flags, "--seed", "4", "--compare")
    assert first["identical"] is True  # plain sampling with the same seed draws the same
    assert first["seed"] == 4 and "temperature 1.5" in first["sampling"]
    assert run(*flags, "--seed", "4", "--method", "jacobi")["text"] == first["text"]
    unseeded = run(*flags)
    assert isinstance(unseeded["seed"], int)  # reported, so the run can be repeated
    assert run(*flags, "--seed", str(unseeded["seed"]))["text"] == unseeded["text"]
    assert run()["sampling"] == "greedy"


def test_cli_sampling_flag_errors(tiny_checkpoint, capsys):
    from msn.cli import main

    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "2"]
    assert main([*base, "--temperature", "0.5"]) == 2
    assert "only apply with --do-sample" in capsys.readouterr().err
    assert main([*base, "--do-sample", "--top-p", "2"]) == 2
    assert "top_p must be a number in [0, 1]" in capsys.readouterr().err


def test_cli_bench_reports_sampling_beside_greedy(tiny_checkpoint, tmp_path, capsys):
    from msn.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_checkpoint), "--limit", "2", "--max-new-tokens", "6"]
    argv += ["--dtype", "float64", "--output", str(out), "--no-progress"]
    argv += ["--methods", "greedy", "tr-jacobi", "--do-sample", "--temperature", "0.8"]
    assert main([*argv, "--seed", "2"]) == 0
    table = capsys.readouterr().out
    for method in ("greedy", "tr-jacobi", "greedy-sample", "tr-jacobi-sample"):
        assert f"| overall | {method} |" in table
    report = (out / "report.md").read_text()
    assert "temperature 0.8, top-k 0, top-p 1, seed 2" in report

    def turns(method):
        lines = (out / f"answers-{method}.jsonl").read_text().splitlines()
        return [json.loads(line)["choices"][0]["turns"] for line in lines]

    # The same seed: tr-jacobi samples the very tokens plain sampling does.
    assert turns("tr-jacobi-sample") == turns("greedy-sample")
    assert turns("greedy-sample") != turns("greedy")
    summary = json.loads((out / "summary.json").read_text())
    speedups = {r["method"]: r["speedup"] for r in summary["rows"] if r["category"] == "overall"}
    assert speedups["greedy-sample"] == 1.0  # sampled methods against plain sampling
    # Another temperature is another run: resuming into the same directory is refused.
    assert main([*argv[:-1], "1.2"]) == 2
    assert "holds answers of another run" in capsys.readouterr().err
