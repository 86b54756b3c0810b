"""The "qfx" torch.compile backend, registered on `import qfx`.

    fast = torch.compile(qmodel, backend="qfx")                       # a converted or loaded qfx model
    fast = torch.compile(hf_model, backend="qfx", options={"recipe": "w4 g128 sym"})  # quantize while compiling

Steps on the Dynamo graph:
1. with `options["recipe"]` (calibration-free recipes only), quantize the graph's linears
   (`quantize_on_the_fly`);
2. on CUDA, lower each `qfx::quantized_linear` that a Triton kernel computes to
   `qfx::kernel_linear` over weights re-packed for that kernel, taking in the online rotation
   (`qfx::hadamard`) that feeds an int8/fp8-activation one, and lower the other rotations to
   `qfx::kernel_hadamard` (`lower_kernels`);
3. where a norm feeds int8/fp8-activation kernel linears, quantize their input per token in
   the norm's own kernel (`quantize_in_producer`), so they read codes;
4. fuse kernel linears that read the same input (q, k, v; gate, up) into one wider launch
   (`fuse_siblings`);
5. hand the graph to Inductor, with the reference implementations of the remaining
   `qfx::quantized_linear`, of `qfx::quantize_rows` (step 3's quantizer) and of
   `qfx::quantize_kv` (the KV-cache quantizer) as decompositions, so that Inductor sees plain
   aten math and fuses the quantizers into one generated kernel with their neighbours. A
   `qfx::hadamard` left over (CPU, or a size the rotation kernel refuses) runs as the op itself.

Options: `recipe` (above), `kernels` ("auto": lower on CUDA; "off": never; "on": also under the
Triton interpreter, for tests), `quantize_in_producer` (default True), `fuse_siblings` (default
True), `decompose` (default True); the rest go to Inductor as config patches. What happened is
recorded in `gm.meta["qfx"]` of the graph handed over.

Inductor's `emulate_precision_casts` defaults to True here (pass False to turn it off): fused
bf16/fp16 ops then round their intermediates as eager does. Left off, Inductor keeps them in
float32, and a per-token activation quantizer downstream sees slightly different inputs; with
fp8 activations behind QuaRot rotations that alone moved SmolLM2's perplexity measurably from
eager (`benchmarks/results/compiled_vs_eager.md`).
"""

from __future__ import annotations

import torch
from torch._dynamo import register_backend
from torch.fx import GraphModule

from qfx.config import Recipe
from qfx.lowering.constant_inputs import ConstantInputs
from qfx.lowering.kernel_op import quantize_rows_ref  # importing it registers the qfx::kernel_* ops
from qfx.ops import quantize_kv_ref, quantized_linear_ref

QFX_OPS = (torch.ops.qfx.quantized_linear.default,)
DECOMPOSITIONS = {torch.ops.qfx.quantized_linear.default: quantized_linear_ref,
                  torch.ops.qfx.quantize_kv.default: quantize_kv_ref,
                  torch.ops.qfx.quantize_rows.default: quantize_rows_ref}
KERNEL_MODES = ("auto", "on", "off")


def qfx_op_count(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in QFX_OPS)


def _use_kernels(mode: str, example_inputs) -> bool:
    if mode not in KERNEL_MODES:
        raise ValueError(f"backend option kernels={mode!r}: choose one of {KERNEL_MODES}")
    if mode == "off":
        return False
    from qfx.lowering.kernels import interpreting, triton_available

    if not triton_available():
        return False
    if mode == "on":
        return True
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return on_cuda and not interpreting()


def _own_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of the graph: Dynamo keeps using the graph object it hands over
    (its placeholders describe the frame's inputs), so passes must not edit that one."""
    graph, copies = torch.fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for old, new in copies.items():  # where each input comes from, for AOT's input matching
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = GraphModule(gm, graph)
    copy.meta.update(gm.meta)  # dynamo_compile_id etc.: AOT reads them to match inputs to sources
    for attr in ("_param_name_to_source",):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


@register_backend(name="qfx")
def qfx_backend(gm: GraphModule, example_inputs, options: dict | None = None):
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    options = dict(options or {})
    decompose = options.pop("decompose", True)
    recipe = options.pop("recipe", None)
    kernels = options.pop("kernels", "auto")
    fuse = options.pop("fuse_siblings", True)
    in_producer = options.pop("quantize_in_producer", True)
    options.setdefault("emulate_precision_casts", True)  # eager's roundings (module docstring)
    info = gm.meta.setdefault("qfx", {})
    gm = _own_copy(gm)
    constants = ConstantInputs(gm)
    if recipe is not None:
        from qfx.lowering.quantize_on_the_fly import quantize_on_the_fly

        recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
        info["quantized_on_the_fly"] = quantize_on_the_fly(gm, example_inputs, recipe, constants)
    info["backend_qfx_ops"] = qfx_op_count(gm)
    if _use_kernels(kernels, constants.example_inputs(example_inputs)):
        from qfx.lowering.lower_kernels import lower_kernels

        info.update(lower_kernels(gm, constants.example_inputs(example_inputs), constants))
        if in_producer:
            from qfx.lowering.quantize_in_producer import quantize_in_producer

            info.update(quantize_in_producer(gm, constants.example_inputs(example_inputs)))
        if fuse:
            from qfx.lowering.fuse_siblings import fuse_sibling_kernels

            info.update(fuse_sibling_kernels(gm, constants.example_inputs(example_inputs), constants))
    constants.prune()
    gm.recompile()
    # compile_fx *replaces* its table with the one given: extend Inductor's own, never drop it
    decomps = {**select_decomp_table(), **DECOMPOSITIONS} if decompose else None
    compiled = compile_fx(gm, constants.example_inputs(example_inputs), config_patches=options,
                          decompositions=decomps)
    return constants.wrap(compiled)
