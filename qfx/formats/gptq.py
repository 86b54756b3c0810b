"""GPTQ-format checkpoints ("gptq" v1, as AutoGPTQ / GPTQModel / vLLM / transformers read it).

Per quantized linear `<path>` with N outputs, K inputs, b bits (2, 4 or 8), groups of g:
- `qweight` int32 (K*b/32, N): column n packs codes of rows k = (32/b)*i .. (32/b)*i + 32/b - 1,
  lowest bits first (the codes run along K).
- `qzeros` int32 (G, N*b/32): zero points minus one (the v1 convention), packed along N.
- `scales` float16 (G, N); `g_idx` int32 (K,) = k // g; `bias` when the layer has one.
Weights are w = (q - (qzeros + 1)) * scale. The model-wide `quantization_config` (bits,
group_size, sym, desc_act) means every quantized layer must share one weight spec, without
activation quantization.
"""

from __future__ import annotations

import json
import re

import torch
from torch.fx import GraphModule

from qfx import primitives as P
from qfx.checkpoint_folder import CheckpointError
from qfx.formats import ExportError, QuantizedLayer, dense_state, hf_config, quantized_layers, write_hf_folder

GPTQ_BITS = (2, 4, 8)


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) codes < 2^bits -> int32 (R*bits/32, C), 32/bits consecutive rows per word."""
    per_word = 32 // bits
    r, c = codes.shape
    shifts = torch.arange(per_word, dtype=torch.int64).reshape(1, per_word, 1) * bits
    words = (codes.to(torch.int64).reshape(r // per_word, per_word, c) << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, signed


def layer_config(layer: QuantizedLayer) -> tuple[int, int, bool]:
    w = layer.plan.weight
    if w.dtype != "int" or w.bits not in GPTQ_BITS:
        raise ExportError(f"{layer.path}: GPTQ format holds int{GPTQ_BITS} weights, not {w.short()}")
    if layer.plan.act is not None:
        raise ExportError(f"{layer.path}: GPTQ format is weight-only; activations are quantized here")
    if w.granularity == "tensor":
        raise ExportError(f"{layer.path}: GPTQ format has no per-tensor weight scales")
    group = w.group_size if w.granularity == "group" else -1
    return w.bits, group, w.symmetric


def layer_tensors(layer: QuantizedLayer, bits: int) -> dict[str, torch.Tensor]:
    plan, p = layer.plan, layer.path
    n, k = plan.out_features, plan.in_features
    per_word = 32 // bits
    if k % per_word or n % per_word:
        raise ExportError(f"{p}: GPTQ packing needs in/out features divisible by {per_word} (got {k}, {n})")
    codes = P.unpack(layer.qweight, bits, k)  # (N, K)
    groups = layer.w_scale.shape[1]
    zero = layer.w_zero if layer.w_zero is not None else torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8)
    if bool((zero == 0).any()):
        raise ExportError(f"{p}: a zero point of 0 cannot be stored in GPTQ v1 (it keeps zero - 1); "
                          "use symmetric weights or the compressed-tensors format")
    group_size = k if groups == 1 else plan.weight.group_size
    return {
        f"{p}.qweight": pack_along_rows(codes.t().contiguous(), bits),
        f"{p}.qzeros": pack_along_rows((zero.to(torch.int16) - 1).to(torch.uint8).contiguous(), bits).t().contiguous(),
        f"{p}.scales": layer.w_scale.t().contiguous().to(torch.float16),
        f"{p}.g_idx": (torch.arange(k) // group_size).to(torch.int32),
    }


def export_gptq(qmodel: GraphModule, path, tokenizer=None) -> None:
    layers = quantized_layers(qmodel)
    if not layers:
        raise ExportError("the model has no quantized linears to export")
    configs = {layer_config(layer) for layer in layers}
    if len(configs) != 1:
        raise ExportError(f"GPTQ format needs one weight spec for all layers; this model has {sorted(configs)}")
    bits, group, sym = configs.pop()
    transposed = set(qmodel.meta["qfx"].get("transposed", []))
    tensors = dense_state(qmodel, layers)
    for layer in layers:
        if layer.plan.weight_target in transposed:
            raise ExportError(f"{layer.path}: a Conv1D layer; GPTQ checkpoints hold nn.Linear modules only")
        tensors.update(layer_tensors(layer, bits))
    quant_config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": False,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": any(layer.plan.is_head for layer in layers),
        "checkpoint_format": "gptq",
    }
    write_hf_folder(path, hf_config(qmodel, layers, quant_config), tensors, tokenizer,
                    extra_files={"quantize_config.json": json.dumps(quant_config, indent=1)})


# -- import -----------------------------------------------------------------------------------


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_along_rows`: int32 (R*bits/32, C) -> codes (R, C) uint8."""
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64).reshape(1, per_word, 1) * bits
    codes = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # (R/pw, pw, C)
    return codes.reshape(-1, words.shape[1]).to(torch.uint8)


def import_gptq(path, device="cpu") -> GraphModule:
    """A GPTQ v1 folder as a graph of qfx ops (act-order checkpoints are refused)."""
    from qfx.config import LayerRule, Recipe, weight_spec
    from qfx.formats import ImportedCheckpoint, build_imported_graph

    ckpt = ImportedCheckpoint(path)
    qc = ckpt.quant_config
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(f"{path}: GPTQ checkpoint_format {qc.get('checkpoint_format')!r}; qfx reads 'gptq' (v1)")
    bits, group, sym = int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True))
    if bits not in GPTQ_BITS:
        raise CheckpointError(f"{path}: {bits}-bit GPTQ checkpoints are not supported (use {GPTQ_BITS})")
    spec = weight_spec(bits, 0 if group == -1 else group, sym, scale_dtype="model")

    def recipe_for(paths):
        skip = tuple(LayerRule(f"^{re.escape(p)}$", weight=None, act=None) for p in paths
                     if f"{p}.qweight" not in ckpt.tensors)
        return Recipe(weight=spec, rules=skip, quantize_head=True)

    def fill(ckpt, plan):
        p, n, k = plan.path, plan.out_features, plan.in_features
        g_idx = ckpt.take(f"{p}.g_idx").long()
        group_size = k if group == -1 else group
        if not torch.equal(g_idx, torch.arange(k) // group_size):
            raise CheckpointError(f"{path}: {p}.g_idx is not k // group_size (act-order); not supported yet")
        codes = unpack_along_rows(ckpt.take(f"{p}.qweight"), bits)[:k].t().contiguous()  # (N, K)
        zeros = unpack_along_rows(ckpt.take(f"{p}.qzeros").t().contiguous(), bits)[:n].t()  # (G, N) -> stored z-1
        zeros = ((zeros.to(torch.int16) + 1) & ((1 << bits) - 1 if not sym else 0xFFFF)).t().contiguous()
        out = {"qweight": P.pack(codes, bits), "w_scale": ckpt.take(f"{p}.scales").float().t().contiguous()}
        if sym:
            if not bool((zeros == (1 << (bits - 1))).all()):
                raise CheckpointError(f"{path}: {p}.qzeros are not the symmetric midpoint but sym=true")
        else:
            out["w_zero"] = zeros.to(torch.uint8)
        return out

    return build_imported_graph(ckpt, recipe_for, fill, device)
