"""compressed-tensors checkpoints (the format vLLM and transformers load).

Per quantized linear `<path>`:
- int weights, no activation quantization, or activations with < 8-bit weights:
  format "pack-quantized": `weight_packed` int32 (N, ceil(K*bits/32)) holding the unsigned
  codes as one dense little-endian bit stream (code i at bit i*bits of its row),
  `weight_scale` (N, G), `weight_shape` int64 [N, K], and for asymmetric weights
  `weight_zero_point` int32 (ceil(N*bits/32), G), the zero codes packed the same way along N.
- int8 weights with int8 activations: "int-quantized": `weight` int8 (signed codes), `weight_scale`.
- fp8: "float-quantized": `weight` float8_e4m3fn, `weight_scale` (N, 1).
Static activation scales are `input_scale` (1,). Scales are written in the model dtype, the
dtype both clients hold them in (quantize with `scale-model` for an exact match).
Layers with the same specs form one config group that targets them by module path.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch.fx import GraphModule

from qfx import primitives as P
from qfx.config import QuantSpec
from qfx.formats import ExportError, QuantizedLayer, dense_state, hf_config, quantized_layers, write_hf_folder


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (R, C) -> int32 (R, ceil(C*bits/32)), dense little-endian bit stream."""
    c = codes.shape[-1]
    padded = torch.nn.functional.pad(codes, (0, (-c) % 32))  # whole 32-code runs = whole words
    words = P.pack(padded, bits).contiguous().view(torch.int32)  # bytes -> little-endian words
    return words[..., : math.ceil(c * bits / 32)].contiguous()


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 (R, W) -> unsigned codes (R, count) uint8."""
    full_words = math.ceil(count / 32) * bits
    words = torch.nn.functional.pad(words, (0, full_words - words.shape[-1]))
    return P.unpack(words.contiguous().view(torch.uint8), bits, count)


def _weight_args(spec: QuantSpec) -> dict:
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[spec.granularity]
    return {
        "num_bits": spec.bits,
        "type": "float" if spec.dtype == "fp8" else "int",
        "symmetric": spec.symmetric,
        "strategy": strategy,
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _act_args(spec: QuantSpec | None) -> dict | None:
    if spec is None:
        return None
    return {
        "num_bits": spec.bits,
        "type": "float" if spec.dtype == "fp8" else "int",
        "symmetric": True,
        "strategy": "token" if spec.dynamic else "tensor",
        "group_size": None,
        "dynamic": spec.dynamic,
        "actorder": None,
        "block_structure": None,
        "observer": None if spec.dynamic else "minmax",
        "observer_kwargs": {},
    }


def layer_format(layer: QuantizedLayer) -> str:
    w, a = layer.plan.weight, layer.plan.act
    if a is not None and a.dynamic and a.clip_ratio != 1.0:
        raise ExportError(f"{layer.path}: activations clipped at {a.clip_ratio} of each token's range; "
                          "compressed-tensors has no activation clip ratio, so serving engines would compute "
                          "other values. Quantize without a-clip to export")
    if w.dtype == "fp8":
        return "float-quantized"
    if a is not None and w.bits == 8:
        if not w.symmetric:
            raise ExportError(f"{layer.path}: int8 weights with int8 activations must be symmetric for compressed-tensors")
        return "int-quantized"
    return "pack-quantized"


def layer_tensors(layer: QuantizedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    plan, fmt = layer.plan, layer_format(layer)
    p = layer.path
    out: dict[str, torch.Tensor] = {f"{p}.weight_scale": layer.w_scale.to(dtype)}
    if fmt == "float-quantized":
        out[f"{p}.weight"] = layer.qweight
    else:
        codes = P.unpack(layer.qweight, plan.weight.bits, plan.in_features)
        if fmt == "int-quantized":
            out[f"{p}.weight"] = (codes.to(torch.int16) - (1 << (plan.weight.bits - 1))).to(torch.int8)
        else:
            out[f"{p}.weight_packed"] = pack_int32(codes, plan.weight.bits)
            out[f"{p}.weight_shape"] = torch.tensor([plan.out_features, plan.in_features], dtype=torch.int64)
            if layer.w_zero is not None:
                out[f"{p}.weight_zero_point"] = pack_int32(layer.w_zero.t().contiguous(), plan.weight.bits).t().contiguous()
    if layer.a_scale is not None:
        out[f"{p}.input_scale"] = layer.a_scale.reshape(1).to(dtype)
    return out


def export_compressed_tensors(qmodel: GraphModule, path, tokenizer=None) -> None:
    layers = quantized_layers(qmodel)
    if not layers:
        raise ExportError("the model has no quantized linears to export")
    transposed = set(qmodel.meta["qfx"].get("transposed", []))
    dtype = getattr(torch, qmodel.meta["qfx"]["source"].get("dtype") or "bfloat16")
    groups: dict[tuple, dict] = {}
    tensors = dense_state(qmodel, layers)
    for layer in layers:
        if layer.plan.weight_target in transposed:
            raise ExportError(f"{layer.path}: a Conv1D layer; compressed-tensors quantizes nn.Linear modules only")
        g = layer.plan.weight.group_size
        if g and layer.plan.in_features % g:
            warnings.warn(f"{layer.path}: in_features {layer.plan.in_features} is not a multiple of group {g}; "
                          "transformers loads it, vLLM's kernels need whole groups", stacklevel=2)
        fmt = layer_format(layer)
        key = (fmt, layer.plan.weight, layer.plan.act)
        group = groups.setdefault(key, {
            "targets": [],
            "weights": _weight_args(layer.plan.weight),
            "input_activations": _act_args(layer.plan.act),
            "output_activations": None,
            "format": fmt,
        })
        group["targets"].append(layer.path)
        tensors.update(layer_tensors(layer, dtype))
    asymmetric = [k for k in groups if k[0] == "pack-quantized" and not k[1].symmetric]
    if asymmetric:
        warnings.warn("asymmetric int weights are written as pack-quantized with packed zero points: vLLM loads "
                      "them, transformers (through compressed-tensors) does not yet (it sizes the packed zero points "
                      "as unpacked); quantize with symmetric weights for a folder both load", stacklevel=2)
    formats = {k[0] for k in groups}
    quant_config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": _ignored_linears(qmodel, layers),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
    write_hf_folder(path, hf_config(qmodel, layers, quant_config), tensors, tokenizer)


def _ignored_linears(gm: GraphModule, layers: list[QuantizedLayer]) -> list[str]:
    from qfx.graph import linear_nodes, module_path

    quantized = {layer.path for layer in layers}
    return sorted({module_path(n) for n in linear_nodes(gm)} - quantized)


# -- import -----------------------------------------------------------------------------------


def _spec_from_args(args: dict | None, weights: bool):
    from qfx.config import ConfigError, QuantSpec

    if args is None:
        return None
    fp8 = args.get("type") == "float"
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    if weights:
        if strategy not in ("group", "channel", "tensor"):
            raise ConfigError(f"compressed-tensors weight strategy {strategy!r} is not supported by qfx")
        return QuantSpec(bits=args["num_bits"], dtype="fp8" if fp8 else "int", symmetric=bool(args.get("symmetric", True)),
                         granularity=strategy, group_size=args.get("group_size") if strategy == "group" else None,
                         scale_dtype="model")
    if strategy not in ("token", "tensor") or not args.get("symmetric", True):
        raise ConfigError(f"compressed-tensors activation scheme {args} is not supported by qfx")
    dynamic = bool(args.get("dynamic", strategy == "token"))
    return QuantSpec(bits=args["num_bits"], dtype="fp8" if fp8 else "int", symmetric=True,
                     granularity="token" if dynamic else "tensor", group_size=None, dynamic=dynamic)


def _target_pattern(target: str) -> str | None:
    if target.startswith("re:"):
        return f"^(?:{target[3:]})"
    if target[:1].isupper() and "." not in target:
        return None  # a class name such as "Linear": every linear
    return f"^{re.escape(target)}$"


def _recipe(quant_config: dict, paths: list[str]):
    from qfx.config import LayerRule, Recipe

    rules, default = [], None
    for target in quant_config.get("ignore", []) or []:
        pattern = _target_pattern(target)
        if pattern is not None:
            rules.append(LayerRule(pattern, weight=None, act=None))
    for group in quant_config.get("config_groups", {}).values():
        w, a = _spec_from_args(group.get("weights"), True), _spec_from_args(group.get("input_activations"), False)
        for target in group.get("targets", []):
            pattern = _target_pattern(target)
            if pattern is None:
                default = (w, a)
            else:
                rules.append(LayerRule(pattern, weight=w, act=a))
    if default is None:  # only named targets: everything else stays in full precision
        rules.append(LayerRule(".*", weight=None, act=None))
        default = (None, None)
    return Recipe(weight=default[0], act=default[1], rules=tuple(rules), quantize_head=True)


def _fill(ckpt, plan) -> dict[str, torch.Tensor]:
    p, spec = plan.path, plan.weight
    out = {"w_scale": ckpt.take(f"{p}.weight_scale").float().reshape(plan.out_features, -1)}
    if spec.dtype == "fp8":
        out["qweight"] = ckpt.take(f"{p}.weight")
    elif f"{p}.weight_packed" in ckpt.tensors:
        codes = unpack_int32(ckpt.take(f"{p}.weight_packed"), spec.bits, plan.in_features)
        out["qweight"] = P.pack(codes, spec.bits)
        if not spec.symmetric:
            zp = ckpt.take(f"{p}.weight_zero_point")
            out["w_zero"] = unpack_int32(zp.t().contiguous(), spec.bits, plan.out_features).t().contiguous()
    else:
        signed = ckpt.take(f"{p}.weight")
        out["qweight"] = P.pack((signed.to(torch.int16) + (1 << (spec.bits - 1))).to(torch.uint8), spec.bits)
    if plan.act is not None and not plan.act.dynamic:
        out["a_scale"] = ckpt.take(f"{p}.input_scale").float().reshape(())
    return out


def import_compressed_tensors(path, device="cpu") -> GraphModule:
    """A compressed-tensors folder (from qfx, llm-compressor, ...) as a graph of qfx ops."""
    from qfx.formats import ImportedCheckpoint, build_imported_graph

    ckpt = ImportedCheckpoint(path)
    qc = ckpt.quant_config
    return build_imported_graph(ckpt, lambda paths: _recipe(qc, paths), _fill, device)
