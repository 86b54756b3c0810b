import torch

from qfx.capture import capture, linear_nodes
from qfx.passes import counts
from qfx.passes.canonicalize_linears import canonicalize_linears
from tests.conftest import tiny_model


def test_gpt2_conv1d_becomes_linear_and_logits_are_unchanged(token_ids):
    model = tiny_model("gpt2")
    gm = canonicalize_linears(capture(model))
    assert counts(gm)["canonicalize_linears"] == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2 layers
    assert len(linear_nodes(gm)) == 9
    assert not any(n.target is torch.ops.aten.addmm.default for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(token_ids), model(input_ids=token_ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)


def test_does_not_fire_on_models_that_already_use_linear(llama):
    gm = canonicalize_linears(capture(llama))
    assert counts(gm)["canonicalize_linears"] == 0


def test_does_not_fire_on_activation_matmuls():
    class AttnLike(torch.nn.Module):
        def forward(self, a, b):
            return torch.mm(a, b)  # both operands are activations, not weights

    gm = canonicalize_linears(capture(AttnLike(), (torch.randn(3, 4), torch.randn(4, 5))))
    assert counts(gm)["canonicalize_linears"] == 0
