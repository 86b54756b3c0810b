import torch

from qfx import primitives as P
from qfx.capture import capture
from qfx.graph import get_attr_tensor, linear_nodes
from qfx.config import Recipe
from qfx.passes import counts
from qfx.passes.annotate_linears import annotate_linears
from qfx.passes.quantize_linears import quantize_linears

QOP = torch.ops.qfx.quantized_linear.default


def _convert(model, text):
    return quantize_linears(annotate_linears(capture(model), Recipe.parse(text)))


def test_replaces_planned_linears_with_packed_ops(llama, token_ids):
    gm = _convert(llama, "w4 g32 asym")
    qops = [n for n in gm.graph.nodes if n.target is QOP]
    assert counts(gm)["quantize_linears"] == len(qops) == 14
    assert [n.args[1].target for n in linear_nodes(gm)] == ["lm_head.weight"]  # the head stays
    q = get_attr_tensor(gm, "model.layers.0.mlp.up_proj.qweight")
    assert q.dtype == torch.uint8 and q.shape == (96, P.packed_width(64, 4))
    assert get_attr_tensor(gm, "model.layers.0.mlp.up_proj.w_zero").shape == (96, 2)
    # the float weight is gone from the module
    assert not hasattr(gm.get_submodule("model.layers.0.mlp.up_proj"), "weight")
    with torch.no_grad():
        ref = llama(input_ids=token_ids, use_cache=False).logits
        out = gm(token_ids)
    assert float((out - ref).norm() / ref.norm()) < 0.2  # 4-bit noise on a random model, not garbage


def test_symmetric_has_no_zero_points_and_8bit_is_close(llama, token_ids):
    gm = _convert(llama, "w8 g0 sym")
    assert not hasattr(gm.get_submodule("model.layers.0.mlp.up_proj"), "w_zero")
    with torch.no_grad():
        ref = llama(input_ids=token_ids, use_cache=False).logits
        sqnr = 20 * torch.log10(ref.norm() / (gm(token_ids) - ref).norm())
    assert float(sqnr) > 30.0


def test_skipped_layers_keep_their_linear(llama):
    gm = _convert(llama, "w4 rule:mlp=skip")
    assert counts(gm)["quantize_linears"] == 8  # q, k, v, o x 2 layers
    assert len(linear_nodes(gm)) == 7  # 3 mlp x 2 + head


def test_allocate_only_gives_the_same_layout(llama):
    real = _convert(llama, "w3 g20 asym a8")
    empty = quantize_linears(annotate_linears(capture(llama), Recipe.parse("w3 g20 asym a8")), allocate_only=True)
    shapes = lambda gm: {k: (tuple(v.shape), v.dtype) for k, v in gm.named_buffers()}  # noqa: E731
    assert shapes(real) == shapes(empty)


def test_model_dtype_scales_are_exact_in_that_dtype():
    from tests.conftest import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16)
    exact = _convert(model, "w4 g32 scale-model")
    scale = get_attr_tensor(exact, "model.layers.0.mlp.up_proj.w_scale")
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.bfloat16().float())
    plain = get_attr_tensor(_convert(model, "w4 g32"), "model.layers.0.mlp.up_proj.w_scale")
    assert not torch.equal(plain, plain.bfloat16().float())
