"""The generation graph of a model: the same pipeline as its full-sequence graph, captured with
positions as an input and given a static KV cache.

    full-sequence graph (qfx.quantize / qfx.load / an import)      the HF model itself (unquantized)
        │ its source (HF config, dtypes) and recipe                    │
        ▼                                                              ▼
    empty model ─capture_for_cache─▶ qfx.pipeline.for_tensors     capture_for_cache
        ─▶ tensors shared with the full-sequence graph (same names)    │
        └──────────────────────────────▶ attach_kv_cache ◀────────────┘

Checkpoints hold no graph, so any of them (old ones and imported folders included) gives
this graph: the tensors are the full-sequence graph's, read by name, not copied.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qfx.capture import capture_for_cache, is_hf_causal_lm
from qfx.config import Recipe
from qfx.passes.attach_kv_cache import CacheError, attach_kv_cache


def generation_graph(model: torch.nn.Module, max_batch: int, length: int) -> GraphModule:
    """`(input_ids, position_ids, cache_position, attention_mask) -> logits` over a KV cache of
    `max_batch` rows and `length` slots, on the device of `model`'s tensors.

    model: a quantized graph (from qfx.quantize, qfx.convert or qfx.load) captured from a
        Hugging Face causal LM, or an unquantized Hugging Face causal LM.
    """
    if max_batch < 1 or length < 1:
        raise CacheError(f"the KV cache needs at least one row and one slot (max_batch={max_batch}, length={length})")
    if isinstance(model, GraphModule):
        return attach_kv_cache(_recaptured(model, length), max_batch, length)
    if not is_hf_causal_lm(model):
        raise CacheError(f"{type(model).__name__} is neither a qfx model nor a Hugging Face causal LM")
    _check_window(model.config, length)
    return attach_kv_cache(capture_for_cache(model), max_batch, length)


def _check_window(config, length: int) -> None:
    """The cache attends over every earlier slot: refuse lengths past a sliding window, where
    the model would attend over fewer."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and length > window:
        raise CacheError(f"{config.model_type} attends over a sliding window of {window} tokens, which the cached "
                         f"graph does not apply: use a max length of at most {window} (asked {length})")


def _recaptured(qmodel: GraphModule, length: int) -> GraphModule:
    from qfx.io import copy_tensors, empty_model
    from qfx.pipeline import for_tensors

    info = qmodel.meta.get("qfx", {})
    source = info.get("source", {})
    if source.get("kind") != "hf_causal_lm" or "recipe" not in info:
        raise CacheError("generation needs a model quantized from a Hugging Face causal LM "
                         "(qfx.quantize, qfx.convert or qfx.load); this graph has no such source")
    device = next((t.device for t in [*qmodel.parameters(), *qmodel.buffers()]), torch.device("cpu"))
    model = empty_model(source, device)
    _check_window(model.config, length)
    gm = for_tensors(capture_for_cache(model), Recipe.from_dict(info["recipe"]))
    copy_tensors(qmodel, gm, "the quantized model")
    gm.meta["qfx"]["recipe"] = info["recipe"]
    return gm
