"""Model configuration read from a Hugging Face `config.json` (LlamaForCausalLM)."""

from __future__ import annotations

import json
import math
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
        if not isinstance(raw, dict):
            raise ValueError(
                f"{source}: expected a JSON object of model settings, got a JSON "
                f"{type(raw).__name__}; re-download config.json (or save it again with "
                "config.save_pretrained)."
            )
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported architecture: model_type={model_type!r}; msn supports "
                f"model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))} "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}), such as Llama-3 and DeepSeek-Coder "
                "checkpoints."
            )
        architectures = raw.get("architectures") or list(SUPPORTED_ARCHITECTURES)
        if isinstance(architectures, str):
            architectures = [architectures]
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

        num_heads = _integer(raw, "num_attention_heads", source)
        num_kv_heads = _integer(raw, "num_key_value_heads", source, default=num_heads)
        hidden_size = _integer(raw, "hidden_size", source)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}."
            )
        head_dim = _integer(raw, "head_dim", source, default=hidden_size // num_heads)
        activation = raw.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(
                f"{source}: unsupported activation: hidden_act={activation!r}; msn's MLP is "
                "SwiGLU with 'silu', as in Llama and DeepSeek-Coder."
            )
        max_positions = _integer(raw, "max_position_embeddings", source, default=2048)
        bos = raw.get("bos_token_id")
        return cls(
            vocab_size=_integer(raw, "vocab_size", source),
            hidden_size=hidden_size,
            intermediate_size=_integer(raw, "intermediate_size", source),
            num_layers=_integer(raw, "num_hidden_layers", source),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_real(raw, "rms_norm_eps", source, 1e-6, "non-negative"),
            max_position_embeddings=max_positions,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=None if bos is None else token_ids(bos, f"{source}: bos_token_id")[0],
            eos_token_ids=token_ids(raw.get("eos_token_id"), f"{source}: eos_token_id"),
            rope=_read_rope(raw, max_positions, source),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


def _as_int(value: Any) -> int | None:
    """An integer from a JSON number (or a numeric string); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _integer(raw: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    """A positive integer field; the error names the field and its value."""
    value = raw.get(key)
    if value is None and default is not None:
        return default
    number = _as_int(value)
    if number is None or number < 1:
        raise ValueError(
            f"{source}: field {key} must be a positive integer, got {value!r}; fix config.json "
            "(or download the checkpoint again)."
        )
    return number


def _real(raw: dict[str, Any], key: str, source: str, default: float, sign: str = "") -> float:
    """A finite number field (`sign`: "positive", "non-negative" or any); errors name it."""
    value = raw.get(key)
    if value is None:
        return default
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if (
        not math.isfinite(number)
        or (sign == "positive" and number <= 0)
        or (sign == "non-negative" and number < 0)
    ):
        raise ValueError(
            f"{source}: field {key} must be a finite {sign + ' ' if sign else ''}number, got "
            f"{value!r}; fix config.json (or download the checkpoint again)."
        )
    return number


def token_ids(value: Any, where: str) -> tuple[int, ...]:
    """Token ids from an int, a list of ints or None; `where` names the field in errors."""
    if value is None:
        return ()
    values = value if isinstance(value, list | tuple) else [value]
    ids = [_as_int(v) if not isinstance(v, str) else None for v in values]
    if any(i is None or i < 0 for i in ids):
        raise ValueError(
            f"{where} must be a token id (an integer >= 0) or a list of them, got {value!r}; "
            "token ids are numbers, not token strings (look the id up with the tokenizer's "
            "convert_tokens_to_ids)."
        )
    return tuple(ids)


def _read_rope(raw: dict[str, Any], max_positions: int, source: str) -> RopeConfig:
    """RoPE from `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: field {key} must be a JSON object, got {value!r}.")
    params = {**scaling, **params}
    theta = _real(raw, "rope_theta", source, 10000.0, "positive")
    theta = _real(params, "rope_theta", source, theta, "positive")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported rope type: rope_type={rope_type!r}; msn supports "
            f"{', '.join(map(repr, SUPPORTED_ROPE_TYPES))}."
        )
    factor = _real(params, "factor", source, 1.0)
    if rope_type != "default" and factor <= 0:
        raise ValueError(f"{source}: rope scaling factor must be positive, got {factor}.")
    original = params.get("original_max_position_embeddings")
    if original is not None:
        original = _integer(params, "original_max_position_embeddings", source)
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
        low_freq_factor=_real(params, "low_freq_factor", source, 1.0),
        high_freq_factor=_real(params, "high_freq_factor", source, 4.0),
        original_max_position_embeddings=None if original is None else int(original),
    )
