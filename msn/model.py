"""A slim Llama / DeepSeek-Coder decoder with a static KV cache and tree-masked attention.

The weights keep Hugging Face's layout (RoPE in the rotate-half convention), so a
`LlamaForCausalLM` checkpoint loads without permutation. The KV cache is preallocated as
`[layers, B, Hkv, S, D]` per keys and values, the layout of `msn_kernels.tree_attention`
and `msn_kernels.compact_kv`.

Two kinds of call:
- `model(tokens)`: a causal pass over `tokens` from position 0 (prefill). It fills the cache
  when one is set up.
- `model(tokens, positions=..., cache_lens=..., tree_mask=...)`: the T new tokens of each
  row b are written to cache slots `[cache_lens[b], cache_lens[b] + T)` and attend to the
  cached prefix plus the new block as `tree_mask` allows. Their rotary positions are
  `positions` (for a tree: prefix length + depth). With `max_cache_len` (a host-side bound
  on `cache_lens` that the caller already knows) such a call reads nothing back to the host,
  so it can run inside a CUDA graph (`msn.step_graph`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msn.config import ModelConfig, RopeConfig
from msn.packed_linear import PackedLinear
from msn_kernels import compact_kv, tree_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, as the reference implementation does, then scale in x's dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, seq_len: int = 0) -> Tensor:
    """Inverse frequencies [head_dim // 2] in fp32 for the configured scaling rule.

    `seq_len` matters only for dynamic NTK scaling, whose base grows with the sequence.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    base = rope.theta
    if rope.type == "dynamic" and seq_len > rope.original_max_position_embeddings:
        growth = rope.factor * seq_len / rope.original_max_position_embeddings - (rope.factor - 1)
        base = base * growth ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope)
    return inv_freq


def dynamic_inverse_frequencies(rope: RopeConfig, head_dim: int, seq_lens: Tensor) -> Tensor:
    """Dynamic NTK frequencies [..., head_dim // 2] for each token's own sequence length.

    Greedy decoding computes a token's keys when the sequence is `position + 1` long; a tree
    pass must rotate each node as greedy would have, not with the base of the deepest node.
    """
    original = rope.original_max_position_embeddings
    seq = seq_lens.double().clamp(min=original)
    base = rope.theta * (rope.factor * seq / original - (rope.factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    exponents = torch.arange(0, head_dim, 2, device=seq_lens.device).double() / head_dim
    return (1.0 / base[..., None] ** exponents).float()


def _llama3_scaled(inv_freq: Tensor, rope: RopeConfig) -> Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth band."""
    original = rope.original_max_position_embeddings
    low_freq_wavelen = original / rope.low_freq_factor
    high_freq_wavelen = original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (original / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos, sin: [B, T, D] in fp32."""
    cos = cos.unsqueeze(1).to(x.dtype)  # (B, 1, T, D)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Static cache, keys and values each `[layers, B, Hkv, S, D]`."""

    k: Tensor
    v: Tensor

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: Tensor, v: Tensor, cache_lens: Tensor) -> None:
        """Store k, v `[B, Hkv, T, D]` of row b at slots `cache_lens[b] + 0..T-1`."""
        batch, heads, steps, dim = k.shape
        slots = cache_lens[:, None] + torch.arange(steps, device=k.device)  # (B, T)
        index = slots[:, None, :, None].expand(batch, heads, steps, dim)  # (B, Hkv, T, D)
        self.k[layer, :batch].scatter_(2, index, k)
        self.v[layer, :batch].scatter_(2, index, v)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = PackedLinear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = PackedLinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = PackedLinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = PackedLinear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        cache_lens: Tensor | None,
        tree_mask: Tensor | None,
        max_cache_len: int | None = None,
    ) -> Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, D)

        if cache_lens is None:
            # Prefill from position 0: plain causal attention over the new block.
            if cache is not None:
                cache.k[self.layer_index, :batch, :, :steps] = k
                cache.v[self.layer_index, :batch, :, :steps] = v
            out = causal_attention(q, k, v)
        else:
            cache.write(self.layer_index, k, v, cache_lens)
            out = tree_attention(
                q,
                cache.k[self.layer_index, :batch],
                cache.v[self.layer_index, :batch],
                cache_lens,
                tree_mask,
                check_lens=False,  # Transformer.forward checked the bound once for all layers
                max_cache_len=max_cache_len,  # host-side: sizes the split count, no read-back
            )
        out = out.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim)
        return self.o_proj(out)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention, q [B, Hq, T, D], k and v [B, Hkv, T, D] (GQA by repetition)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = PackedLinear(hidden, inner, bias=bias)
        self.up_proj = PackedLinear(hidden, inner, bias=bias)
        self.down_proj = PackedLinear(inner, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor, cos, sin, cache, cache_lens, tree_mask, max_cache_len=None):
        attn = self.self_attn(
            self.input_layernorm(x), cos, sin, cache, cache_lens, tree_mask, max_cache_len
        )
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Module names follow Hugging Face's (`layers.0.self_attn.q_proj`, ...) minus `model.`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = PackedLinear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cache: KVCache | None = None
        self._inv_freq: dict[torch.device, Tensor] = {}
        # The longest sequence (prompt + output) to handle; the cache grows up to it on demand.
        self.max_seq_len = config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        """Allocate the KV cache for `max_seq_len` positions (default: `self.max_seq_len`).

        An existing cache at least that large is reused; its contents are not cleared.
        """
        max_seq_len = max_seq_len or self.max_seq_len
        cache = self.cache
        if (
            cache is None
            or cache.batch_size < batch_size
            or cache.max_seq_len < max_seq_len
            or cache.k.device != self.device
            or cache.k.dtype != self.dtype
        ):
            shape = (
                self.config.num_layers,
                batch_size,
                self.config.num_kv_heads,
                max_seq_len,
                self.config.head_dim,
            )
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.cache = KVCache(k=k, v=torch.zeros_like(k))
        return self.cache

    def compact_cache(self, cache_lens: Tensor, accepted_nodes: Tensor) -> None:
        """Move the accepted tree nodes' keys/values to the slots right after each prefix.

        `accepted_nodes` [B, M]: node indices relative to `cache_lens[b]`, root first, -1
        padded (as `greedy_verify` returns them). All layers move in one call. Only the first
        B rows move: a cache set up for a larger batch serves smaller ones, as in `forward`.
        """
        batch = accepted_nodes.shape[0]
        compact_kv(self.cache.k[:, :batch], self.cache.v[:, :batch], cache_lens, accepted_nodes)

    def rotary(self, positions: Tensor, cached: bool) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, D] in fp32 for integer positions [B, T].

        Dynamic NTK scaling depends on the sequence length: a prefill uses its own length for
        every token (as transformers does), a cached call each token's position + 1.
        """
        rope, head_dim = self.config.rope, self.config.head_dim
        if rope.type == "dynamic" and cached:
            inv_freq = dynamic_inverse_frequencies(rope, head_dim, positions + 1)  # (B, T, D/2)
        elif rope.type == "dynamic":
            seq_len = int(positions.max()) + 1
            inv_freq = rope_inverse_frequencies(rope, head_dim, seq_len).to(positions.device)
        else:
            inv_freq = self._inv_freq.get(positions.device)
            if inv_freq is None:
                inv_freq = rope_inverse_frequencies(rope, head_dim).to(positions.device)
                self._inv_freq[positions.device] = inv_freq
        freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return angles.cos(), angles.sin()

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache_lens: Tensor | None = None,
        tree_mask: Tensor | None = None,
        last_only: bool = False,
        max_cache_len: int | None = None,
    ) -> Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`).

        Without `cache_lens`: a causal pass from position 0. With `cache_lens` [B]: the tokens
        go to cache slots after each row's prefix; `positions` [B, T] defaults to those slots
        and `tree_mask` ([T, T] or [B, T, T], bool) to causal. `max_cache_len`: an int bound
        on `cache_lens` known on the host (a decoder's own count; any value >= the largest
        length is correct). Given, the bounds check uses it and the call reads nothing back
        (no GPU synchronisation, so it can be captured in a CUDA graph); the attention sizes
        its split count from it. None reads `cache_lens.max()` back instead.
        """
        batch, steps = tokens.shape
        if cache_lens is None:
            if positions is not None or tree_mask is not None:
                raise ValueError("positions and tree_mask need cache_lens (the prefix lengths).")
            if steps > self.max_seq_len:
                raise ValueError(
                    f"{steps} tokens exceed the model's maximum sequence length of "
                    f"{self.max_seq_len} (its context unless load_model(max_seq_len=...) "
                    "set another)."
                )
            positions = torch.arange(steps, device=tokens.device).expand(batch, steps)
            cache = self.cache if self._cache_fits(batch, steps) else None
        else:
            cache = self.cache
            if cache is None or cache.batch_size < batch:
                raise ValueError(
                    "a call with cache_lens needs a KV cache for the batch: call "
                    "model.setup_cache(batch_size, max_seq_len) and prefill first."
                )
            if max_cache_len is None:
                max_cache_len = int(cache_lens.max())  # a read-back: syncs a GPU
            if max_cache_len + steps > cache.max_seq_len:
                raise ValueError(
                    f"the KV cache holds {cache.max_seq_len} positions, but a prefix of "
                    f"{max_cache_len} plus {steps} new tokens does not fit; set up a "
                    "larger cache (setup_cache(max_seq_len=...))."
                )
            if positions is None:
                positions = cache_lens[:, None] + torch.arange(steps, device=tokens.device)
            if tree_mask is None:
                tree_mask = torch.ones(steps, steps, dtype=torch.bool, device=tokens.device).tril()

        cos, sin = self.rotary(positions, cached=cache_lens is not None)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, cache_lens, tree_mask, max_cache_len)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _cache_fits(self, batch: int, steps: int) -> bool:
        cache = self.cache
        return cache is not None and cache.batch_size >= batch and cache.max_seq_len >= steps
