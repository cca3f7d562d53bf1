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
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
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
    tag: str = field(default="")

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.tag}]"


def _attention_configs(full: bool) -> list[Config]:
    import torch

    from msn_kernels.tree_attention import tile_config

    # rows = GROUP x T packed query rows: 1, 32 and 276 pick 16-, 32- and 64-row tiles.
    grid = (
        [(d, rows, ns, dt) for d in (16, 32, 64, 128) for rows in (1, 32, 276) for ns in (1, 2)
         for dt in ("bf16", "fp16", "fp32")]
        if full
        else [(128, 276, 2, "bf16"), (128, 1, 1, "fp16"), (64, 32, 1, "bf16"), (16, 1, 2, "fp16"),
              (128, 276, 2, "fp32")]
    )  # fmt: skip
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    strides = tuple(f"stride_{t}{d}" for t, dims in zip("qkvo", ("bht", "bhs", "bhs", "bht"),
                                                    strict=True) for d in dims)  # fmt: skip
    configs = []
    for d, rows, ns, dt in grid:
        tiles = tile_config(rows, d, dtypes[dt])
        types = dict.fromkeys(("Q", "K", "V", "Out"), f"*{dt}") | {
            "CacheLens": "*i64", "Mask": "*u8", "PartO": "*fp32", "PartLse": "*fp32",
            "qk_scale": "fp32"}  # fmt: skip
        constexprs = {"GROUP": 4, "HEAD_DIM": d, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
                      "NUM_SPLITS": ns, "FP32_DOT": dt == "fp32"}  # fmt: skip
        configs.append(Config(
            "msn_kernels.tree_attention", "_tree_attention_kernel", types, constexprs,
            aligned=("Q", "K", "V", "Out", "CacheLens", "Mask", "PartO", "PartLse", *strides),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, expect_mma=dt != "fp32",
            tag=f"{dt},D={d},M={tiles.block_m},S={ns}",
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
    for t_pad in (16, 32, 64, 128) if full else (16, 128):
        configs.append(Config(
            "msn_kernels.greedy_verify", "_verify_walk_kernel",
            {"PartVal": "*fp32", "PartIdx": "*i32", "Tokens": "*i64", "Parents": "*i32",
             "Depths": "*i32", "AcceptLen": "*i64", "AcceptedNodes": "*i64", "NextToken": "*i64"},
            {"NUM_CHUNKS": 4, "CHUNKS_PAD": 4, "T_PAD": t_pad,
             "LOG_T": (t_pad - 1).bit_length(), "PATH_PAD": 16},
            aligned=("PartVal", "PartIdx", "Tokens", "Parents", "Depths", "AcceptLen",
                     "AcceptedNodes", "NextToken"),
            num_warps=4 if t_pad <= 64 else 8, tag=f"T={t_pad}",
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
        wants_sass = config.expect_mma or config.expect_barrier
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
        "barriers": sass.count("BAR.SYNC"),
    }


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
        try:
            result = _compile_and_inspect(config, args.arch)
        except Exception as error:  # reported per configuration, the test shows which failed
            result = {"name": config.name, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(result), flush=True)


CONFIGS = all_configs(FULL)


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_compiles_without_spills(codegen, arch: int, config: Config) -> None:
    record = codegen[(arch, config.name)]
    assert "error" not in record, record.get("error")
    assert record["stack"] == 0 and record["local"] == 0, f"register spills: {record}"
    assert record["shared"] <= SHARED_LIMIT[arch], f"shared memory over the limit: {record}"
    if config.expect_mma:
        assert record["mma"] > 0, f"no tensor-core instructions: {record}"
    if config.expect_barrier:
        assert record["barriers"] > 0, f"no barrier between loads and stores: {record}"


if __name__ == "__main__":
    _main()
