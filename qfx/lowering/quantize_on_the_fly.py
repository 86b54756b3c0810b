"""Backend pass: quantize an unquantized model's linears while compiling it.

    fast = torch.compile(hf_model, backend="qfx", options={"recipe": "w4 g128 sym"})

Requires: a Dynamo graph whose linear weights are placeholders (parameters, with their
tensors in `example_inputs`) or get_attr constants; a calibration-free recipe (RTN weights,
dynamic or no activation quantization, optionally a KV cache); other methods (GPTQ, AWQ,
SmoothQuant, rotations) are refused, never skipped.
Guarantees: every linear the recipe selects (module path from the parameter's name; the LM
head only with `quantize_head` or a rule) becomes `qfx::quantized_linear` over constants
`_qfx_q_<i>_<field>` (new graph inputs the backend feeds), quantized now from the current
weights, exactly as `qfx.quantize` would; with a `kv` spec, every attention's keys and values
pass through `qfx::quantize_kv` first.
"""

from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node

from qfx.config import ConfigError, Recipe
from qfx.lowering.constant_inputs import ConstantInputs
from qfx.ops import NO_ACT_QUANT, QuantizedLinearArgs
from qfx.passes import finish
from qfx.passes.annotate_linears import is_head
from qfx.passes.quantize_kv import insert_kv_quantizers
from qfx.quantizer import op_group_size, quantize_weight_tensors

LINEARS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)


def module_path(weight: Node) -> str:
    """`L_self_modules_model_modules_layers_modules_0_modules_q_proj_parameters_weight_` ->
    `model.layers.0.q_proj` (Dynamo's placeholder names); get_attr targets lose `.weight`."""
    if weight.op == "get_attr":
        return weight.target.rpartition(".")[0]
    m = re.fullmatch(r"L_self_(.*)_parameters_weight_", weight.name, flags=re.IGNORECASE)
    if not m:
        return weight.name
    return re.sub(r"_modules_", ".", "_" + m.group(1)).strip(".").removeprefix("modules_")


def check_calibration_free(recipe: Recipe) -> None:
    others = [m for m in recipe.methods if m != "rtn"]
    if others:  # calibration (GPTQ, AWQ, SmoothQuant...) or whole-model rewrites (rotations)
        raise ConfigError(f"options['recipe'] uses {', '.join(others)}, which compiling alone cannot apply "
                          "(it needs calibration data or rewrites the whole model); "
                          "run qfx.quantize(model, recipe, calib=...) first and compile its result")
    specs = [recipe.act] + [r.act for r in recipe.rules if not isinstance(r.act, str)]
    if any(s is not None and not s.dynamic for s in specs):
        raise ConfigError("options['recipe'] asks for static activation scales, which need calibration; "
                          "use dynamic (per-token) activations, or qfx.prepare/convert")


def quantize_on_the_fly(gm: GraphModule, example_inputs, recipe: Recipe, constants: ConstantInputs) -> int:
    """Rewrite in place; returns how many linears were quantized."""
    check_calibration_free(recipe)
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS]
    # the LM head: the last linear the output is reached from without crossing another linear
    # (keys and values reach it too when the model returns its KV cache, but come earlier)
    head = next((n for n in reversed(linears) if is_head(n)), None)
    done = 0
    for node in linears:
        x, w_node = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(w_node, Node) or w_node.op not in ("placeholder", "get_attr"):
            continue
        weight = inputs[w_node] if w_node.op == "placeholder" else gm.get_parameter(w_node.target)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        w_spec, a_spec = recipe.resolve(module_path(w_node), node is head)
        if w_spec is None:
            continue
        tensors = quantize_weight_tensors(weight.detach(), w_spec)
        attrs = {name: constants.add(f"_qfx_q_{done}_{name}", t) for name, t in tensors.items()}
        with gm.graph.inserting_before(node):
            q = gm.graph.call_function(torch.ops.qfx.quantized_linear.default, tuple(QuantizedLinearArgs(
                x, attrs["qweight"], attrs["w_scale"], attrs.get("w_zero"), bias, w_bits=w_spec.bits,
                group_size=op_group_size(w_spec), in_features=weight.shape[1],
                a_bits=NO_ACT_QUANT if a_spec is None else a_spec.bits, a_scale=None)))
        q.meta = dict(node.meta)
        node.replace_all_uses_with(q)
        gm.graph.erase_node(node)
        done += 1
    if recipe.kv is not None:  # keys and values through qfx::quantize_kv, as qfx.quantize puts them
        insert_kv_quantizers(gm, recipe.kv, ATTENTIONS)
    finish(gm, "quantize_on_the_fly", done)
    return done


# scaled_dot_product_attention as Dynamo records it (a torch function) and as aten
ATTENTIONS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention,
              torch.ops.aten.scaled_dot_product_attention.default)
