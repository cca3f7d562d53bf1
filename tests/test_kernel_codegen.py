"""GPU code generation of the kernels, checked on a CPU-only machine.

Each kernel configuration is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))` for sm_80 and sm_90, and the `cuobjdump` shipped with Triton
reads the cubin: no STACK/LOCAL bytes (register spills), dynamic shared memory within the card's
limit, tensor-core instructions (HMMA/HGMMA) in the attention kernel and the barrier that orders
compact_kv's loads before its stores. This catches what the interpreter cannot: tiles the GPU
rejects, bf16 paths, register pressure, races between threads.

Compilation runs in two subprocesses (one per architecture) with the interpreter off, because
under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled. By default
a representative set of configurations is compiled (largest and smallest tiles of every kernel,
both split modes, every dtype); MSN_CODEGEN_FULL=1 compiles all of them (about 200
compilations).

Run directly: `python tests/test_kernel_codegen.py --arch 90 [--full]` prints one JSON line per
configuration.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import triton

from msn_kernels.compact_kv import compact_kv_num_warps

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # dynamic shared memory per block
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FULL = os.environ.get("MSN_CODEGEN_FULL", "") == "1"


@dataclass(frozen=True)
class Config:
    """One compilation: kernel, argument types, constexprs, launch options."""

    module: str
    kernel: str
    types: dict[str, str]  # signature of pointer/float arguments ("*bf16"); others are i32
    constexprs: dict[str, object]
    aligned: tuple[str, ...]  # arguments the launcher specialises as multiples of 16
    num_warps: int = 4
    num_stages: int = 3
    expect_mma: bool = False
    expect_barrier: bool = False
    attention: bool = False  # check the tree-attention tile's instruction counts
    arch: int | None = None  # compiled for this architecture only (None: every one)
    ctas_per_sm: int = 1  # resident programs per SM the configuration promises
    tag: str = field(default="")

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.tag}]"


def _attention_config(arch: int, d: int, rows: int, splits: int, dt: str) -> Config:
    import torch

    from msn_kernels.tree_attention import tile_config

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    tiles = tile_config(rows, d, dtypes[dt], arch)
    strides = tuple(f"stride_{t}{d}" for t, dims in zip("qkvo", ("bht", "bhs", "bhs", "bht"),
                                                    strict=True) for d in dims)  # fmt: skip
    types = dict.fromkeys(("Q", "K", "V", "Out"), f"*{dt}") | {
        "CacheLens": "*i64", "Mask": "*u8", "PartO": "*fp32", "PartLse": "*fp32",
        "qk_scale": "fp32"}  # fmt: skip
    constexprs = {"GROUP": 4, "HEAD_DIM": d, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
                  "NUM_SPLITS": splits, "FP32_DOT": dt == "fp32"}  # fmt: skip
    return Config(
        "msn_kernels.tree_attention", "_tree_attention_kernel", types, constexprs,
        aligned=("Q", "K", "V", "Out", "CacheLens", "Mask", "PartO", "PartLse", *strides),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, expect_mma=dt != "fp32",
        attention=True, arch=arch, ctas_per_sm=tiles.ctas_per_sm,
        tag=f"sm_{arch},{dt},D={d},M={tiles.block_m},N={tiles.block_n},"
            f"W={tiles.num_warps},S={splits}",
    )  # fmt: skip


def _attention_configs(full: bool) -> list[Config]:
    """Every TILE_TABLE entry on its own architecture (full), or a representative subset.

    The subset: every D=128 entry in bf16 with one split, the largest D=128 tile in fp16 with
    partials, the largest D=64 tile in bf16 with partials, and the fp32 tile.
    """
    from msn_kernels.tree_attention import TILE_TABLE

    configs = []
    for (arch, table_d), entries in TILE_TABLE.items():
        rows_of = [b if b is not None else 276 for b, _ in entries]  # rows each entry serves
        heads = {32: (16, 32), 64: (64,), 128: (128,)}[table_d]
        for i, rows in enumerate(rows_of):
            largest = i == len(rows_of) - 1
            for d in heads:
                for dt in ("bf16", "fp16"):
                    for splits in (1, 2):
                        wanted = full or (
                            (table_d == 128 and dt == "bf16" and splits == 1)
                            or (largest and table_d == 128 and dt == "fp16" and splits == 2)
                            or (largest and d == 64 and dt == "bf16" and splits == 2)
                        )
                        if wanted:
                            configs.append(_attention_config(arch, d, rows, splits, dt))
    for arch in ARCHS:
        for d in (16, 32, 64, 128) if full else (128,):
            for splits in (1, 2) if full else (2,):
                configs.append(_attention_config(arch, d, 276, splits, "fp32"))
    # The control: the old sm_90 tile (64 rows on 8 warps), which duplicates QK^T.
    control = _attention_config(90, 128, 64, 1, "bf16")
    configs.append(replace(
        control, num_warps=8, attention=False,
        tag=control.tag.replace("W=4", "W=8") + ",duplicating-control",
    ))  # fmt: skip
    for d in (16, 32, 64, 128) if full else (128,):
        for dt in ("bf16", "fp16", "fp32") if full else ("bf16",):
            configs.append(Config(
                "msn_kernels.tree_attention", "_merge_splits_kernel",
                {"PartO": "*fp32", "PartLse": "*fp32", "Out": f"*{dt}"},
                {"NUM_SPLITS": 4, "HEAD_DIM": d, "BLOCK_R": 32},
                aligned=("PartO", "PartLse", "Out"), tag=f"{dt},D={d}",
            ))  # fmt: skip
    return configs


def _verify_and_compact_configs(full: bool) -> list[Config]:
    configs = [
        Config(
            "msn_kernels.greedy_verify", "_argmax_partial_kernel",
            {"Logits": f"*{dt}", "PartVal": "*fp32", "PartIdx": "*i32"},
            {"NUM_CHUNKS": 4, "BLOCK_R": 1, "BLOCK_V": 1024},
            aligned=("Logits", "PartVal", "PartIdx", "chunk", "stride_lb", "stride_lt"), tag=dt,
        )
        for dt in (("bf16", "fp16", "fp32") if full else ("bf16", "fp32"))
    ]  # fmt: skip
    for t_pad in (16, 32, 64, 128, 256) if full else (16, 256):
        configs.append(Config(
            "msn_kernels.greedy_verify", "_verify_walk_kernel",
            {"PartVal": "*fp32", "PartIdx": "*i32", "Tokens": "*i64", "Parents": "*i32",
             "Depths": "*i32", "Scratch": "*i32", "AcceptLen": "*i64", "AcceptedNodes": "*i64",
             "NextToken": "*i64"},
            {"NUM_CHUNKS": 4, "CHUNKS_PAD": 4, "T_PAD": t_pad,
             "LOG_T": (t_pad - 1).bit_length(), "PATH_PAD": 16},
            aligned=("PartVal", "PartIdx", "Tokens", "Parents", "Depths", "Scratch", "AcceptLen",
                     "AcceptedNodes", "NextToken"),
            num_warps=4 if t_pad <= 64 else 8, expect_barrier=True, tag=f"T={t_pad}",
        ))  # fmt: skip
    strides = [f"stride_{t}{d}" for t in "kv" for d in "lbhs"]
    compact_sizes = (
        [(m, d, dt) for m in (16, 64, 128) for d in (16, 32, 64, 128)
         for dt in ("bf16", "fp16", "fp32")]
        if full else [(16, 16, "bf16"), (16, 128, "bf16"), (128, 128, "fp32")]
    )  # fmt: skip
    for block_m, d, dt in compact_sizes:
        configs.append(Config(
            "msn_kernels.compact_kv", "_compact_kv_kernel",
            {"K": f"*{dt}", "V": f"*{dt}", "CacheLens": "*i64", "Accepted": "*i64"},
            {"HEAD_DIM": d, "BLOCK_M": block_m},
            aligned=("K", "V", "CacheLens", "Accepted", *strides), expect_barrier=True,
            num_warps=compact_kv_num_warps(block_m, d), tag=f"{dt},D={d},M={block_m}",
        ))  # fmt: skip
    return configs


def all_configs(full: bool) -> list[Config]:
    return _attention_configs(full) + _verify_and_compact_configs(full)


def _compile_and_inspect(config: Config, arch: int) -> dict[str, object]:
    """Compile one configuration and read its resource usage (runs with the interpreter off)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(config.module), config.kernel)
    signature = {
        name: "constexpr" if name in config.constexprs else config.types.get(name, "i32")
        for name in kernel.arg_names
    }
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in config.aligned}
    source = ASTSource(kernel, signature, constexprs=config.constexprs, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = _cuobjdump("--dump-resource-usage", cubin.name)
        wants_sass = config.expect_mma or config.expect_barrier or config.attention
        sass = _cuobjdump("--dump-sass", cubin.name) if wants_sass else ""
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {
        "name": config.name,
        "registers": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared": int(compiled.metadata.shared),
        "mma": sass.count("HMMA") + sass.count("HGMMA"),
        "mma_shapes": _mma_shapes(sass),
        "ex2": sass.count("MUFU.EX2"),
        "barriers": sass.count("BAR.SYNC"),
    }


def _mma_shapes(sass: str) -> dict[str, int]:
    """Tensor-core instructions by shape: "HMMA.16816" (one warp), "HGMMA.64x32x16" (warpgroup)."""
    shapes: dict[str, int] = {}
    for found in re.findall(r"\b(HMMA\.\d+|HGMMA\.\d+x\d+x\d+)", sass):
        shapes[found] = shapes.get(found, 0) + 1
    return shapes


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run(
        [str(NVIDIA_BIN / "cuobjdump"), flag, path], capture_output=True, text=True, check=True
    ).stdout


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, required=True)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    for config in all_configs(args.full):
        if config.arch not in (None, args.arch):
            continue
        try:
            result = _compile_and_inspect(config, args.arch)
        except Exception as error:  # reported per configuration, the test shows which failed
            result = {"name": config.name, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(result), flush=True)


CONFIGS = all_configs(FULL)
CASES = [(arch, c) for c in CONFIGS for arch in ARCHS if c.arch in (None, arch)]


@pytest.fixture(scope="module")
def codegen() -> dict[tuple[int, str], dict[str, object]]:
    """Compile everything once, both architectures in parallel; skip without the toolchain."""
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (NVIDIA_BIN / tool).exists()]
    if missing:
        pytest.skip(f"Triton's NVIDIA toolchain lacks {missing} in {NVIDIA_BIN}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve())] + (["--full"] if FULL else [])
    procs = {
        arch: subprocess.Popen(
            [*command, "--arch", str(arch)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for arch in ARCHS
    }  # fmt: skip
    results = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            pytest.fail(f"codegen subprocess for sm_{arch} failed:\n{err[-3000:]}")
        for line in out.splitlines():
            record = json.loads(line)
            results[(arch, record["name"])] = record
    return results


@pytest.mark.parametrize(("arch", "config"), CASES, ids=[f"sm_{a}-{c.name}" for a, c in CASES])
def test_compiles_without_spills(codegen, arch: int, config: Config) -> None:
    record = codegen[(arch, config.name)]
    assert "error" not in record, record.get("error")
    assert record["stack"] == 0 and record["local"] == 0, f"register spills: {record}"
    assert record["shared"] <= SHARED_LIMIT[arch], f"shared memory over the limit: {record}"
    if config.expect_mma:
        assert record["mma"] > 0, f"no tensor-core instructions: {record}"
    if config.expect_barrier:
        assert record["barriers"] > 0, f"no barrier between loads and stores: {record}"


# One HMMA is issued by a warp, one HGMMA by a warpgroup (4 warps); m x n x k per instruction.
HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8)}
SM_REGISTERS = 65536
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}  # shared memory per SM (A100, H100)
SHARED_LIMIT_ANY_SM80 = 99 * 1024  # sm_86/sm_89 cards also take the sm_80 table
REGISTER_MARGIN = 240  # of 255: room for Triton/ptxas changes before a config spills


def mma_work(shapes: dict[str, int], num_warps: int) -> int:
    """Multiply-adds the whole program issues: per-thread SASS count x issuing units."""
    total = 0
    for name, count in shapes.items():
        kind, shape = name.split(".")
        if kind == "HGMMA":
            m, n, k = (int(x) for x in shape.split("x"))
            total += count * m * n * k * (num_warps // 4)
        else:
            m, n, k = HMMA_SHAPES[shape]
            total += count * m * n * k * num_warps
    return total


ATTENTION = [(a, c) for a, c in CASES if c.attention]


@pytest.mark.parametrize(
    ("arch", "config"), ATTENTION, ids=[f"sm_{a}-{c.name}" for a, c in ATTENTION]
)
def test_attention_tile_does_the_minimum_work(codegen, arch: int, config: Config) -> None:
    """No duplicated QK^T, no duplicated exponentials, a register margin, promised occupancy.

    The kernel has two copies of the online-softmax step (the prefix loop and the tree loop),
    each run once per K/V tile of BLOCK_N keys, and neither is unrolled, so a loop body's static
    instruction count is its per-iteration count. One body must multiply
    QK^T [BLOCK_M, D] x [D, BLOCK_N] and PV [BLOCK_M, BLOCK_N] x [BLOCK_N, D]:
    2 x BLOCK_M x BLOCK_N x D multiply-adds. The SASS is per thread, so the work the program
    issues is sum(count x m x n x k) over its MMA instructions, times the issuing units: every
    warp for HMMA.16816 (16 x 8 x 16), every warpgroup for HGMMA.64xNx16. Equality with
    2 bodies x 2 x BLOCK_M x BLOCK_N x D means no warp or warpgroup recomputes another's tile
    (the sm_90 64-row, 8-warp build computes the full score tile in both warpgroups: 1.5x).

    Exponentials: p = exp2(s - m) needs BLOCK_M x BLOCK_N per body, spread over
    32 x num_warps threads (the p share); alpha = exp2(m_old - m_new) is one per row a thread
    holds, and an MMA accumulator layout gives a thread two adjacent columns of each row it
    holds, so at most half the p share. A count above 1.5 x the p share per body means the
    score tile is exponentiated more than once (the fp32 build, on FMA units with a blocked
    layout, gets only the upper bound of twice the p share).
    """
    record = codegen[(arch, config.name)]
    assert "error" not in record, record.get("error")
    c = config.constexprs
    bm, bn, d, warps = c["BLOCK_M"], c["BLOCK_N"], c["HEAD_DIM"], config.num_warps
    bodies, threads = 2, 32 * warps
    if config.expect_mma:
        minimum = bodies * 2 * bm * bn * d
        assert mma_work(record["mma_shapes"], warps) == minimum, (
            f"MMA work {mma_work(record['mma_shapes'], warps)} != tile minimum {minimum}: {record}"
        )
    p_share = bm * bn // threads
    # The fp32 (FMA) build's blocked layout may hold one column per row: alpha <= p share.
    alpha = p_share // 2 if config.expect_mma else p_share
    low, high = bodies * p_share, bodies * (p_share + alpha)
    assert low <= record["ex2"] <= high, (
        f"MUFU.EX2 {record['ex2']} not in [{low}, {high}]: {record}"
    )
    assert record["registers"] <= REGISTER_MARGIN, f"no register margin: {record}"
    regs = math.ceil(record["registers"] / 8) * 8  # allocation granularity per thread
    assert config.ctas_per_sm * regs * threads <= SM_REGISTERS, f"fewer CTAs/SM: {record}"
    assert config.ctas_per_sm * record["shared"] <= SM_SHARED[arch], f"fewer CTAs/SM: {record}"
    if arch == 80:
        assert record["shared"] <= SHARED_LIMIT_ANY_SM80, f"too big for sm_86/89: {record}"


def test_minimum_work_check_sees_the_duplicating_sm90_tile(codegen) -> None:
    """The check above fails on a known-bad tile: 64 rows on 8 warps (2 warpgroups) on sm_90."""
    (control,) = [c for c in CONFIGS if c.tag.endswith("duplicating-control")]
    record = codegen[(90, control.name)]
    assert "error" not in record, record.get("error")
    c = control.constexprs
    minimum = 2 * 2 * c["BLOCK_M"] * c["BLOCK_N"] * c["HEAD_DIM"]
    # QK^T twice (once per warpgroup), PV once: 1.5x the minimum.
    assert mma_work(record["mma_shapes"], control.num_warps) == 3 * minimum // 2, record


if __name__ == "__main__":
    _main()
