"""Replace each planned aten.linear with qfx::quantized_linear over packed weights.

Requires: annotate_linears (and calibrated observers: range observers for static
activations, Hessian observers when the recipe's weight method is GPTQ or GPTAQ), or tensors
already chosen block by block by `qfx.calibrate` in `gm.meta["qfx"]["solved"][path]`.
Guarantees: every LinearPlan'd linear becomes one `qfx.quantized_linear` call reading
`<path>.qweight`, `<path>.w_scale`, optionally `<path>.w_zero` and `<path>.a_scale`
buffers; the float weight is removed from the module when nothing else reads it; input
observers are gone. Linears without a plan are untouched.

With `allocate_only=True` the buffers are allocated with the right shapes and dtypes but not
computed: `qfx.load` fills them from a checkpoint.
"""

from __future__ import annotations

import warnings

import torch
from torch.fx import GraphModule, Node

from qfx import distributed
from qfx import primitives as P
from qfx.graph import get_attr_tensor, set_attr_tensor
from qfx.algorithms.gptaq import asymmetric_target
from qfx.algorithms.gptq import gptq_quantize
from qfx.config import ConfigError, QuantSpec, Recipe
from qfx.observers import AsymmetricHessianObserver, ChannelStatsObserver, HessianObserver, RangeObserver
from qfx.ops import NO_ACT_QUANT, QuantizedLinearArgs
from qfx.passes import finish
from qfx.passes.annotate_linears import LinearPlan, plans
from qfx.quantizer import op_group_size, quantize_weight_tensors, round_scale


def empty_weight_tensors(plan: LinearPlan) -> dict[str, torch.Tensor]:
    """Tensors of the shapes `quantize_weight_tensors` would give, uninitialised."""
    spec, n, k = plan.weight, plan.out_features, plan.in_features
    if spec.dtype == "fp8":
        return {"qweight": torch.empty(n, k, dtype=P.FP8_DTYPE), "w_scale": torch.empty(n, 1)}
    g = op_group_size(spec)
    groups = P.n_groups(k, g) if g else 1
    out = {
        "qweight": torch.empty(n, P.packed_width(k, spec.bits), dtype=torch.uint8),
        "w_scale": torch.empty(n, groups),
    }
    if not spec.symmetric:
        out["w_zero"] = torch.empty(n, groups, dtype=torch.uint8)
    return out


def _observers_before(gm: GraphModule, x) -> tuple[object, dict[type, torch.nn.Module], list[Node]]:
    """Walk back through observer call_modules: (real input, observers by type, their nodes)."""
    found: dict[type, torch.nn.Module] = {}
    nodes = []
    while isinstance(x, Node) and x.op == "call_module":
        module = gm.get_submodule(x.target)
        kind = next((k for k in (RangeObserver, HessianObserver, ChannelStatsObserver) if isinstance(module, k)), None)
        if kind is None:
            break
        found[kind] = module
        nodes.append(x)
        x = x.args[0]
    return x, found, nodes


def _gptq_weight_tensors(w: torch.Tensor, spec: QuantSpec, hessian: HessianObserver, recipe: Recipe) -> dict:
    if hessian.n_tokens == 0:
        raise ConfigError(f"{hessian.name}: GPTQ saw no calibration tokens; run calibration batches first")
    if hessian.n_tokens < w.shape[1]:
        warnings.warn(f"{hessian.name}: GPTQ Hessian from {hessian.n_tokens} tokens for {w.shape[1]} inputs is "
                      "rank-deficient; damping keeps it solvable, but give more calibration tokens", stacklevel=3)
    group = spec.group_size if spec.granularity == "group" else None
    model_dtype = w.dtype
    if isinstance(hessian, AsymmetricHessianObserver):  # GPTAQ: GPTQ towards the full-precision outputs
        w = asymmetric_target(w, hessian.hessian, hessian.delta_cross, recipe.gptq.damp, recipe.gptaq.alpha)
    codes, scale, zero = gptq_quantize(w, hessian.hessian, spec.bits, spec.symmetric, group, damp=recipe.gptq.damp,
                                       act_order=recipe.gptq.act_order, clip_ratio=spec.clip_ratio,
                                       range_search=recipe.gptq.range_search,
                                       scale_dtype=model_dtype if spec.scale_dtype == "model" else None)
    out = {"qweight": P.pack(codes, spec.bits), "w_scale": scale}
    if zero is not None:
        out["w_zero"] = zero
    return out


def _joint_gptq(gm: GraphModule, recipe: Recipe, solved: dict) -> dict[str, dict]:
    """GPTQ tensors of every linear with a Hessian observer; linears sharing one observer (and
    so one Hessian and weight spec) are solved as one stacked weight: GPTQ treats rows
    independently given H, so the result is the same, with one column loop instead of several."""
    groups: dict[int, list] = {}
    for node, plan in plans(gm):
        if plan.path in solved:
            continue
        _, observers, _ = _observers_before(gm, node.args[0])
        if HessianObserver in observers:
            groups.setdefault(id(observers[HessianObserver]), []).append((plan, observers[HessianObserver]))
    out = {}
    for i, members in enumerate(groups.values()):
        if i % distributed.world() != distributed.rank():
            continue  # under torchrun, another process solves this group (shared below)
        plans_, hessian = [p for p, _ in members], members[0][1]
        weights = [get_attr_tensor(gm, p.weight_target) for p in plans_]
        tensors = _gptq_weight_tensors(torch.cat(weights), plans_[0].weight, hessian, recipe)
        row = 0
        for p in plans_:
            out[p.path] = {k: v[row : row + p.out_features] for k, v in tensors.items()}
            row += p.out_features
    if distributed.active():
        devices = {p.path: get_attr_tensor(gm, p.weight_target).device for members in groups.values() for p, _ in members}
        out = {path: {k: v.to(devices[path]) for k, v in t.items()} for path, t in distributed.share(out).items()}
    return out


def quantize_linears(gm: GraphModule, allocate_only: bool = False) -> GraphModule:
    recipe = Recipe.from_dict(gm.meta["qfx"]["recipe"]) if "recipe" in gm.meta.get("qfx", {}) else None
    solved = gm.meta.get("qfx", {}).get("solved", {})
    gptq = {} if allocate_only else _joint_gptq(gm, recipe, solved)
    replaced = 0
    for node, plan in plans(gm):
        x, observers, observer_nodes = _observers_before(gm, node.args[0])
        bias = node.args[2] if len(node.args) > 2 else None
        weight = get_attr_tensor(gm, plan.weight_target)
        a_scale = None
        done = solved.pop(plan.path, None)
        if RangeObserver in observers and not allocate_only and done is None:
            observer = observers[RangeObserver]
            lo, hi = observer.range()
            a_scale = observer.symmetric_scale(plan.act.bits, plan.act.clip_ratio) if plan.act.dtype == "int" else P.fp8_scale(
                torch.maximum(-lo, hi))
        if plan.act is not None and not plan.act.dynamic and allocate_only:
            a_scale = torch.empty((), dtype=torch.float32)
        if done is not None:  # chosen block by block during calibration
            tensors = dict(done)
            a_scale = tensors.pop("a_scale", None)
        elif allocate_only:
            tensors = empty_weight_tensors(plan)
        elif plan.path in gptq:
            tensors = gptq[plan.path]
        else:
            tensors = quantize_weight_tensors(weight, plan.weight)
        if a_scale is not None:
            tensors["a_scale"] = round_scale(a_scale.reshape(()).float(), plan.act, weight.dtype)
        attr_nodes = {}
        with gm.graph.inserting_before(node):
            for name, t in tensors.items():
                target = f"{plan.path}.{name}"
                set_attr_tensor(gm, target, t.to(weight.device))
                attr_nodes[name] = gm.graph.get_attr(target)
            a_bits = NO_ACT_QUANT if plan.act is None else plan.act.bits
            q = gm.graph.call_function(
                torch.ops.qfx.quantized_linear.default,
                tuple(QuantizedLinearArgs(
                    x, attr_nodes["qweight"], attr_nodes["w_scale"], attr_nodes.get("w_zero"), bias,
                    w_bits=plan.weight.bits, group_size=op_group_size(plan.weight), in_features=plan.in_features,
                    a_bits=a_bits, a_scale=attr_nodes.get("a_scale"),
                    a_clip=1.0 if plan.act is None or not plan.act.dynamic else plan.act.clip_ratio)),
            )
        q.meta = dict(node.meta)
        node.replace_all_uses_with(q)
        w_node = node.args[1]
        gm.graph.erase_node(node)
        for obs_node in observer_nodes:  # nearest first: each becomes unused once its user is gone
            if not obs_node.users:
                gm.graph.erase_node(obs_node)
        _drop_unused_attr(gm, w_node)
        replaced += 1
    gm.delete_all_unused_submodules()
    return finish(gm, "quantize_linears", replaced)


def _drop_unused_attr(gm: GraphModule, attr: Node) -> None:
    """Erase a get_attr node nobody reads, and its tensor when no other node names it."""
    if attr.users:
        return
    target = attr.target
    gm.graph.erase_node(attr)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)
