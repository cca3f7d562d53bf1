"""MSN: Make Some Noise fine-tuning and lossless TR-Jacobi decoding for Llama-family models."""

from msn.batch_decoding import generate_batch
from msn.checkpoint import load_model, load_tokenizer
from msn.config import ModelConfig
from msn.decoding import GenerationResult, generate
from msn.default_model import default_model_path
from msn.interop import from_transformers

__version__ = "0.1.0"


__all__ = [
    "GenerationResult",
    "ModelConfig",
    "default_model_path",
    "from_transformers",
    "generate",
    "generate_batch",
    "load_model",
    "load_tokenizer",
]
