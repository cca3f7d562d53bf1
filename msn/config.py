"""Model configuration read from a Hugging Face `config.json` (LlamaForCausalLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: base frequency plus an optional scaling rule."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3 scaling (Llama 3.1+): wavelength bands between low and high frequency factors.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)
    torch_dtype: str | None = None

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of keys and values stored per token and batch row, all layers together."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """Read the fields of a transformers 4.x or 5.x `LlamaConfig` dictionary."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported architecture: model_type={model_type!r}; msn supports "
                f"model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))} "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}), such as Llama-3 and DeepSeek-Coder "
                "checkpoints."
            )
        architectures = raw.get("architectures") or list(SUPPORTED_ARCHITECTURES)
        unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unsupported:
            raise ValueError(
                f"{source}: unsupported architecture: architectures={unsupported!r}; msn "
                f"supports {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        missing = [
            key
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if key not in raw
        ]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}.")

        num_heads = int(raw["num_attention_heads"])
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        hidden_size = int(raw["hidden_size"])
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}."
            )
        head_dim = raw.get("head_dim") or hidden_size // num_heads
        activation = raw.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(
                f"{source}: unsupported activation: hidden_act={activation!r}; msn's MLP is "
                "SwiGLU with 'silu', as in Llama and DeepSeek-Coder."
            )
        max_positions = int(raw.get("max_position_embeddings", 2048))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_positions,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            rope=_read_rope(raw, max_positions, source),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _read_rope(raw: dict[str, Any], max_positions: int, source: str) -> RopeConfig:
    """RoPE from `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported rope type: rope_type={rope_type!r}; msn supports "
            f"{', '.join(map(repr, SUPPORTED_ROPE_TYPES))}."
        )
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and factor <= 0:
        raise ValueError(f"{source}: rope scaling factor must be positive, got {factor}.")
    original = params.get("original_max_position_embeddings")
    if rope_type == "dynamic":
        # transformers' dynamic NTK scaling grows from max_position_embeddings, whatever the
        # rope settings say.
        original = max_positions
    if rope_type == "llama3" and original is None:
        raise ValueError(
            f"{source}: rope_type 'llama3' needs original_max_position_embeddings in its "
            "rope scaling settings."
        )
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=factor if rope_type != "default" else 1.0,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original is None else int(original),
    )
