"""Models msn decodes with: transformers Llama models as they are, and one call at a time.

`from_transformers(hf_model)` builds the slim `msn.model.Transformer` over a loaded
`transformers.LlamaForCausalLM`'s own `nn.Parameter` objects: no tensor is copied, the slim
model lives on the same device in the same dtype, and it follows the HF model through
`.to(...)` / `.half()` (which swap the parameters' data in place). The slim model is built
once per HF model and kept in a weak table, so repeated `msn.generate(hf_model, ...)` calls
reuse it (and its KV cache); it is rebuilt when the HF model's parameters were replaced
(e.g. `resize_token_embeddings`).

Concurrency: the KV cache (and the running acceptance statistics that `tree="auto"` updates)
live on the model, so two decoding calls on one model at the same time would overwrite each
other's cache. Every decoding entry point (`msn.generate`, `msn.generate_batch`) therefore
holds `exclusive(model)`, a re-entrant lock per model, for the whole call: concurrent calls
on one model from several threads are serialised and each returns exactly what it would
return alone. A lock rather than a cache per thread, because on one device concurrent calls
would not run faster anyway (GPU kernels of one stream run in turn; CPU ops already use all
cores), while a cache per thread would multiply KV memory and still leave the shared
statistics to guard; for throughput, decode many prompts in one `msn.generate_batch` call.
Two different models (even two slim models over the same weights) decode in parallel.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch import nn

from msn.config import SUPPORTED_ARCHITECTURES, ModelConfig, token_ids
from msn.model import Transformer

_F = TypeVar("_F", bound=Callable[..., Any])

# hf model -> its slim model; per model -> its lock. Weak keys: nothing here keeps a model
# alive, and no attribute is set on the user's modules (an nn.Module attribute would become
# a registered submodule of the HF model and show up in its state_dict).
_SLIM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _unsupported(model: Any) -> TypeError:
    kind = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None:
        kind += f" (model_type={model_type!r})"
    hint = ""
    if hasattr(model, "merge_and_unload"):
        hint = " For a peft model, merge the adapter first: model.merge_and_unload()."
    return TypeError(
        f"msn decodes {', '.join(SUPPORTED_ARCHITECTURES)} models (Llama and DeepSeek-Coder "
        f"checkpoints); got a transformers {kind}.{hint} Load a supported checkpoint with "
        "msn.load_model(path), or pass a transformers LlamaForCausalLM."
    )


def _mapped_parameters(hf_model: nn.Module, config: ModelConfig) -> dict[str, nn.Parameter]:
    """msn parameter name -> the HF model's own Parameter for it (lm_head: the tied one)."""
    inner = hf_model.model
    params: dict[str, nn.Parameter] = {
        "embed_tokens.weight": inner.embed_tokens.weight,
        "norm.weight": inner.norm.weight,
        "lm_head.weight": hf_model.lm_head.weight,
    }
    for i, layer in enumerate(inner.layers):
        for module_name in ("self_attn", "mlp"):
            module = getattr(layer, module_name)
            for proj_name, proj in module.named_children():
                if not isinstance(proj, nn.Linear):
                    continue
                for kind in ("weight", "bias"):
                    tensor = getattr(proj, kind, None)
                    if tensor is not None:
                        params[f"layers.{i}.{module_name}.{proj_name}.{kind}"] = tensor
        params[f"layers.{i}.input_layernorm.weight"] = layer.input_layernorm.weight
        params[f"layers.{i}.post_attention_layernorm.weight"] = (
            layer.post_attention_layernorm.weight
        )
    return params


def _config_of(hf_model: nn.Module) -> ModelConfig:
    raw = hf_model.config.to_dict()
    raw.setdefault("architectures", None)
    config = ModelConfig.from_hf_dict(raw, source=f"{type(hf_model).__name__}.config")
    generation = getattr(hf_model, "generation_config", None)
    extra = token_ids(getattr(generation, "eos_token_id", None), "generation_config.eos_token_id")
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
    return replace(config, eos_token_ids=merged)


def from_transformers(hf_model: Any) -> Transformer:
    """The slim msn model over `hf_model`'s own weight tensors (no copy, same device/dtype).

    `hf_model` is a loaded `transformers.LlamaForCausalLM` on one device (not on "meta", not
    split by a `device_map`). The slim model holds the HF model's very `nn.Parameter`
    objects, so both see any later in-place change of the weights (fine-tuning steps,
    `.to(device)`, `.half()`). It is built once per HF model and reused while the HF model's
    parameters stay the same objects. Other architectures raise a TypeError naming those msn
    supports.
    """
    from transformers import LlamaForCausalLM

    if not isinstance(hf_model, LlamaForCausalLM):
        raise _unsupported(hf_model)
    with _REGISTRY_LOCK:
        slim = _SLIM.get(hf_model)
        if slim is None or not _still_shared(slim, hf_model):
            slim = _build(hf_model)
            _SLIM[hf_model] = slim
        return slim


def _still_shared(slim: Transformer, hf_model: nn.Module) -> bool:
    """Whether the cached slim model still holds exactly the HF model's parameters."""
    try:
        config = _config_of(hf_model)
    except ValueError:
        return False
    if config != slim.config:
        return False
    mine = dict(slim.named_parameters(remove_duplicate=False))
    theirs = _mapped_parameters(hf_model, config)
    return mine.keys() == theirs.keys() and all(mine[n] is p for n, p in theirs.items())


def _build(hf_model: nn.Module) -> Transformer:
    try:
        config = _config_of(hf_model)
    except ValueError as error:
        raise ValueError(f"msn cannot decode this {type(hf_model).__name__}: {error}") from error
    params = _mapped_parameters(hf_model, config)
    devices = {p.device for p in params.values()}
    dtypes = {p.dtype for p in params.values()}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            "the transformers model has weights on the 'meta' device (not loaded, or offloaded "
            "by a device_map); load it fully onto one device (e.g. .to('cuda')) first."
        )
    if len(devices) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"msn decodes a model that sits on one device in one dtype; this one spans "
            f"devices {sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))} "
            "(a device_map split or a partial cast): move it with model.to(device, dtype)."
        )
    with torch.device("meta"):
        slim = Transformer(config)
    expected = dict(slim.named_parameters(remove_duplicate=False))
    problems = [f"missing {n}" for n in expected if n not in params]
    problems += [f"unexpected {n}" for n in params if n not in expected]
    problems += [
        f"{n} has shape {tuple(p.shape)}, expected {tuple(expected[n].shape)}"
        for n, p in params.items()
        if n in expected and p.shape != expected[n].shape
    ]
    if problems:
        raise ValueError("the transformers model does not match its config: " + "; ".join(problems))
    for name, param in params.items():
        module_name, _, attribute = name.rpartition(".")
        setattr(slim.get_submodule(module_name), attribute, param)  # the Parameter itself
    slim.eval()  # the slim model has no dropout; requires_grad stays as the user set it
    slim.max_seq_len = config.max_position_embeddings
    return slim


def resolve_model(model: Any) -> Any:
    """The model msn decodes with: an msn model unchanged, a transformers Llama model's slim
    twin (`from_transformers`). Anything else is a TypeError naming what is accepted."""
    if isinstance(model, Transformer):
        return model
    if _is_transformers_model(model):
        return from_transformers(model)
    if callable(model) and hasattr(model, "setup_cache") and hasattr(model, "config"):
        return model  # duck-typed msn models (test stubs, wrappers) decode as they are
    raise TypeError(
        f"expected a model from msn.load_model(...) or msn.from_transformers(...), or a "
        f"transformers LlamaForCausalLM; got {type(model).__name__}."
    )


def msn_view(model: Any) -> Any:
    """`from_transformers(model)` for a transformers model, anything else unchanged: for
    helpers keyed by the model (latency profile, acceptance statistics) that accept both."""
    return from_transformers(model) if _is_transformers_model(model) else model


def _lock_for(model: Any) -> threading.RLock:
    with _REGISTRY_LOCK:
        try:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = threading.RLock()
        except TypeError:  # not weakly referenceable: keep the lock on the object itself
            lock = model.__dict__.setdefault("_msn_lock", threading.RLock())
        return lock


@contextlib.contextmanager
def exclusive(model: Any) -> Iterator[Any]:
    """Hold `model`'s decoding lock (re-entrant) and yield the resolved model.

    Every msn decoding call holds it for its whole duration, since the KV cache lives on the
    model; wrap your own sequences of low-level calls on a shared model (`setup_cache`, a
    prefill, cached passes) in it too. A transformers model and its slim twin share one lock.
    """
    resolved = resolve_model(model)
    with _lock_for(resolved):
        yield resolved


def decoding_entry(function: _F) -> _F:
    """Decorator for decoding calls `f(model, ...)`: resolve the model, hold `exclusive`."""

    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with exclusive(model) as resolved:
            return function(resolved, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
