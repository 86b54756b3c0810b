"""Checkpoint formats other tools load: what every exporter shares.

An exporter turns a quantized graph into a Hugging Face folder (config.json with a
`quantization_config`, safetensors, tokenizer files). The graph gives two things:
`quantized_layers` (each qfx op with its plan and tensors) and `dense_state` (every other
tensor of the original checkpoint, under its original name).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.fx import GraphModule

from qfx.graph import get_attr_tensor
from qfx.checkpoint_folder import CheckpointError, atomic_dir
from qfx.ops import QuantizedLinearArgs
from qfx.passes.annotate_linears import LinearPlan

QOP = torch.ops.qfx.quantized_linear.default


class ExportError(ValueError):
    """A model that the requested format cannot represent; the message names the layer."""


@dataclass
class QuantizedLayer:
    path: str
    plan: LinearPlan
    qweight: torch.Tensor  # (N, ceil(K/8)*bits) uint8 packed codes, or (N, K) fp8
    w_scale: torch.Tensor  # (N, G) float32
    w_zero: torch.Tensor | None  # (N, G) uint8 codes
    a_scale: torch.Tensor | None  # () float32, static activations only
    has_bias: bool


def quantized_layers(gm: GraphModule) -> list[QuantizedLayer]:
    layers = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not QOP:
            continue
        plan = n.meta.get("qfx")
        if not isinstance(plan, LinearPlan):
            raise ExportError(f"quantized op {n.name} carries no plan; export a model from qfx.quantize / qfx.load")
        fetch = lambda a: None if a is None else get_attr_tensor(gm, a.target)  # noqa: E731
        a = QuantizedLinearArgs.of(n)
        layers.append(QuantizedLayer(plan.path, plan, fetch(a.qweight), fetch(a.w_scale), fetch(a.w_zero),
                                     fetch(a.a_scale), a.bias is not None))
    return layers


def source_of(gm: GraphModule) -> dict:
    source = gm.meta.get("qfx", {}).get("source", {})
    if source.get("kind") != "hf_causal_lm":
        raise ExportError("serving formats need a model captured from a Hugging Face causal LM")
    online = sorted({str(n.target) for n in gm.graph.nodes
                     if n.op == "call_function" and str(n.target).startswith(("qfx.hadamard", "qfx.quantize_kv"))})
    if online:
        raise ExportError(f"the graph computes {', '.join(online)} at run time, which the serving formats cannot "
                          "express; save it with qfx.save or export it as a torch.export program (qfx.export)")
    return source


def dense_state(gm: GraphModule, layers: list[QuantizedLayer]) -> dict[str, torch.Tensor]:
    """Full-precision tensors under their checkpoint names; quantized weights left out,
    Conv1D weights transposed back, tied weights written once."""
    source = source_of(gm)
    skip = {layer.plan.weight_target for layer in layers}
    transposed = set(gm.meta["qfx"].get("transposed", []))
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name in source.get("state_names", []):
        if name in skip:
            continue
        try:
            t = get_attr_tensor(gm, name)
        except AttributeError:
            continue  # not read by the graph (e.g. an unused buffer)
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue  # a tied weight: the model re-ties it on load
        seen.add(key)
        t = t.detach()
        out[name] = (t.t() if name in transposed else t).contiguous().cpu()
    return out


def hf_config(gm: GraphModule, layers: list[QuantizedLayer], quantization_config: dict) -> dict:
    source = source_of(gm)
    config = copy.deepcopy(source["config"])
    if any(layer.plan.is_head for layer in layers) or gm.meta["qfx"].get("untied"):
        config["tie_word_embeddings"] = False  # the head is quantized or rotated; the embedding is not
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = source.get("dtype")
    return config


def write_hf_folder(path, config: dict, tensors: dict[str, torch.Tensor], tokenizer=None, extra_files=None) -> Path:
    """Write config.json, model.safetensors, tokenizer files (atomically: temp folder, rename)."""

    with atomic_dir(path, overwrite=False) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def load_tokenizer(src: str | os.PathLike | None) -> object | None:
    """The tokenizer saved in a checkpoint folder, or None when it holds none."""
    if src is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError):
        return None


# -- importing checkpoints written by other tools ----------------------------------------------


class ImportedCheckpoint:
    """A foreign HF folder: its config (without quantization_config) and every tensor in it."""

    def __init__(self, path):
        from safetensors.torch import load_file


        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: no config.json")
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: corrupt ({e})") from None
        self.quant_config = self.config.pop("quantization_config", None) or {}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no .safetensors files")
        self.tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                self.tensors.update(load_file(str(f)))
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None

    def take(self, name: str) -> torch.Tensor:

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors.pop(name)


def build_imported_graph(ckpt: ImportedCheckpoint, recipe_for, fill_layer, device="cpu") -> GraphModule:
    """Graph of qfx ops for a foreign checkpoint.

    recipe_for(linear paths) -> Recipe describing the checkpoint's layout;
    fill_layer(ckpt, plan) -> {"qweight", "w_scale", ["w_zero"], ["a_scale"]} for one layer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qfx.capture import capture
    from qfx.graph import linear_nodes, module_path, set_attr_tensor
    from qfx.passes.annotate_linears import plans
    from qfx.passes.canonicalize_linears import canonicalize_linears
    from qfx.pipeline import for_tensors

    dtype = getattr(torch, str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "bfloat16"))
    config = AutoConfig.for_model(**ckpt.config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # real init: computed buffers
    state = model.state_dict()
    # a `.weight` with a sibling `.weight_scale` holds quantized codes, not a dense weight
    dense = {k: v for k, v in ckpt.tensors.items()
             if k in state and not (k.endswith(".weight") and k + "_scale" in ckpt.tensors)}
    model.load_state_dict(dense, strict=False)
    for k in dense:
        ckpt.tensors.pop(k)
    gm = capture(model.to(device))  # traced on the device it will run on
    recipe = recipe_for([module_path(n) for n in linear_nodes(canonicalize_linears(gm))])
    gm = for_tensors(gm, recipe)
    for _node, plan in plans(gm):
        for name, value in fill_layer(ckpt, plan).items():
            target = f"{plan.path}.{name}"
            expected = get_attr_tensor(gm, target)
            if tuple(value.shape) != tuple(expected.shape):
                raise CheckpointError(f"{ckpt.path}: {target} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(expected.shape)}")
            set_attr_tensor(gm, target, value.to(device=expected.device, dtype=expected.dtype))
    leftover = [k for k in ckpt.tensors if not k.endswith(("weight_shape", "g_idx"))]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: tensors the model does not use: {sorted(leftover)[:5]}")
    return gm
