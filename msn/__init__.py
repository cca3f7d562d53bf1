"""MSN: Make Some Noise fine-tuning and lossless TR-Jacobi decoding for Llama-family models."""

from pathlib import Path

from msn.checkpoint import load_model, load_tokenizer
from msn.config import ModelConfig
from msn.decoding import GenerationResult, generate

__version__ = "0.1.0"

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"


def default_model_path() -> Path:
    """The small MSN model shipped inside the package (used when no --model is given)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; rebuild it with "
            "`python scripts/build_default_model.py` or pass --model PATH."
        )
    return DEFAULT_MODEL_DIR


__all__ = [
    "GenerationResult",
    "ModelConfig",
    "default_model_path",
    "generate",
    "load_model",
    "load_tokenizer",
]
