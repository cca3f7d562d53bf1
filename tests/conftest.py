"""Test-wide setup: on a machine without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before
any test module imports msn_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread avoids OpenMP spinning, which costs more than it gives.
torch.set_num_threads(1)


import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOKENIZER_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\n\nfor line in sys.stdin:\n    print(line.strip())\n",
    "Noise makes the model robust to wrong context tokens.",
] * 8


def build_tiny_tokenizer(vocab_size: int = 320, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained in milliseconds, with optional chat template."""
    from transformers import PreTrainedTokenizerFast

    from msn.data import train_byte_level_bpe

    special = ["<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    backend = train_byte_level_bpe(TOKENIZER_CORPUS, vocab_size, special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|end|>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama(path, tokenizer=None, seed: int = 0, **config_overrides):
    """Save a randomly initialised tiny LlamaForCausalLM (norm weights perturbed) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
    )
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session", autouse=True)
def _msn_measurements_in_tmp(tmp_path_factory):
    """Latency profiles, acceptance statistics and conversions of tests stay out of ~/.cache/msn."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MSN_CACHE", str(tmp_path_factory.mktemp("msn-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A directory with a tiny random Llama checkpoint and a chat-template tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    save_tiny_llama(path, tokenizer, vocab_size=len(tokenizer))
    return path
