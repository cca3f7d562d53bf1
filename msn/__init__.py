"""MSN: Make Some Noise fine-tuning and lossless TR-Jacobi decoding for Llama-family models."""

__version__ = "0.1.0"
