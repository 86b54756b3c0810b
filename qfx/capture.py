"""Model -> torch.fx.GraphModule through torch.export (helpers that read the graph: `qfx.graph`).

A Hugging Face causal LM is captured as `input_ids (B, S) int64 -> logits (B, S, V)` with
dynamic batch and sequence length; any other nn.Module as its own forward on the example
inputs given. Parameters keep their original names (`model.layers.0.self_attn.q_proj.weight`)
as `get_attr` targets, and every op node keeps the module path it came from.
"""

from __future__ import annotations

import types

import torch
from torch.export import Dim
from torch.fx import GraphModule

MAX_BATCH = 4096


class CaptureError(RuntimeError):
    """A model that torch.export could not capture; the message says where and why."""


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings") and hasattr(model, "generation_config")


def capture(
    model: torch.nn.Module,
    example_inputs: tuple | None = None,
    dtype: torch.dtype | None = None,
    dynamic_shapes=None,
    positions: bool = False,
) -> GraphModule:
    """Capture `model` as a GraphModule.

    model: a Hugging Face causal LM (captured as input_ids -> logits) or any nn.Module.
    example_inputs: positional inputs to trace with; for HF models defaults to a small
        batch of token ids. Required for other modules.
    dtype: cast the model to this dtype first (the captured graph is specific to it).
    dynamic_shapes: as torch.export takes it; HF models default to dynamic batch and
        sequence dimensions, other modules to static shapes.
    positions: HF models only: capture `(input_ids (B, S), position_ids (B, S)) -> logits`,
        the graph `qfx.passes.attach_kv_cache` turns into a generation graph (see
        `capture_for_cache`).
    """
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    hf = is_hf_causal_lm(model)
    source: dict = {"kind": "module", "class": type(model).__name__}
    if hf:
        example_inputs, dynamic_shapes = _hf_defaults(model, example_inputs, dynamic_shapes, positions)
        source = {
            "kind": "hf_causal_lm",
            "class": type(model).__name__,
            "config": model.config.to_dict(),
        }
    elif example_inputs is None:
        raise CaptureError(f"capture({type(model).__name__}): pass example_inputs, a tuple of the forward's inputs")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    try:
        with _logits_forward(model, positions) if hf else _nullcontext():
            ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # torch.export raises many types; report them all the same way
        raise CaptureError(_explain(model, e)) from e
    gm = ep.module()
    first_param = next(iter(model.parameters()), None)
    source["dtype"] = str(first_param.dtype).removeprefix("torch.") if first_param is not None else None
    # buffers need not share the parameters' dtype (HF keeps rotary tables in float32 unless
    # the model was .to()'d): a rebuilt model must match exactly, so record every one
    source["tensor_dtypes"] = {
        name: str(t.dtype).removeprefix("torch.")
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }
    # names a checkpoint of this model holds (exports write these, not non-persistent buffers)
    source["state_names"] = list(model.state_dict().keys())
    gm.meta["qfx"] = {"source": source}
    if positions:
        gm.meta["qfx"]["positions"] = True
    return gm


def capture_for_cache(model: torch.nn.Module) -> GraphModule:
    """A Hugging Face causal LM as `(input_ids (B, S), position_ids (B, S)) -> logits (B, S, V)`.

    The positions are an input (not `arange(S)`), so that the graph can be given a KV cache:
    `qfx.passes.attach_kv_cache` replaces each attention by one over the cache, and the mask
    HF builds here becomes dead code. The quantization passes apply to it as to `capture`'s
    graph, and its tensors have the same names.
    """
    if not is_hf_causal_lm(model):
        raise CaptureError(f"{type(model).__name__} is not a Hugging Face causal LM: generation needs one")
    return capture(model, positions=True)


def hf_dynamic_shapes(max_seq: int) -> tuple:
    """Dynamic batch and sequence dimensions for input_ids.

    DYNAMIC hints, not named Dims: a named Dim turns every guard the shape solver cannot prove
    into an error (torch 2.11 fails to prove min(16*s, 32*s) == 16*s for Llama's attention);
    the hints keep the guards, which hold for every length in range.
    """
    return ({0: Dim.DYNAMIC(min=1, max=MAX_BATCH), 1: Dim.DYNAMIC(min=1, max=max_seq)},)


def _hf_defaults(model, example_inputs, dynamic_shapes, positions: bool = False):
    if example_inputs is None:
        vocab = int(getattr(model.config, "vocab_size", 32))
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        example_inputs = (torch.randint(0, vocab, (2, 16), generator=g).to(device),)
        if positions:  # rows at different offsets, as left-padded prompts have them
            example_inputs += (torch.arange(16, device=device).repeat(2, 1) + torch.tensor([[0], [3]], device=device),)
    if dynamic_shapes is None:
        max_seq = int(getattr(model.config, "max_position_embeddings", None) or 8192)
        max_seq = max_seq if max_seq > 0 else 8192  # e.g. XLNet's -1: no limit
        dynamic_shapes = hf_dynamic_shapes(max_seq)
        if positions:
            dynamic_shapes = (dynamic_shapes[0], dynamic_shapes[0])
    return example_inputs, dynamic_shapes


class _logits_forward:
    """Temporarily make an HF model's forward `input_ids -> logits` (no cache, no dict), or
    `(input_ids, position_ids) -> logits`."""

    def __init__(self, model, positions: bool = False):
        self.model = model
        self.positions = positions

    def __enter__(self):
        full = self.model.forward

        def forward(self, input_ids):
            return full(input_ids=input_ids, use_cache=False).logits

        def forward_at(self, input_ids, position_ids):
            return full(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

        if self.positions:
            forward = forward_at
        self.model.forward = types.MethodType(forward, self.model)

    def __exit__(self, *exc):
        del self.model.forward


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _explain(model: torch.nn.Module, e: Exception) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    where = ""
    for ln in lines:  # torch.export messages name the user frame as 'File "...", line N, in fn'
        if 'File "' in ln and "site-packages/torch" not in ln:
            where = ln.strip()
    head = lines[0] if lines else type(e).__name__
    msg = f"could not capture {type(model).__name__} with torch.export: {type(e).__name__}: {head}"
    if where:
        msg += f" (at {where})"
    return msg


# -- graph queries ----------------------------------------------------------------------
