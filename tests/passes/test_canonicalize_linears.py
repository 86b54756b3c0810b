import pytest
import torch

from qfx.capture import capture
from qfx.graph import linear_nodes
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


class _MatmulLinear(torch.nn.Linear):
    """A linear written as `x @ self.weight.T`, its bias added separately."""

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class _Projections(torch.nn.Module):
    """One projection in each form a model writes them in."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(40, 16)
        self.a = _MatmulLinear(16, 24)
        self.b = _MatmulLinear(24, 16, bias=False)
        self.stored_in_out = torch.nn.Parameter(torch.randn(16, 16, generator=g))  # x @ W, W (in, out)
        self.transposed = torch.nn.Parameter(torch.randn(16, 16, generator=g))  # x @ W.transpose(0, 1)
        self.permuted = torch.nn.Parameter(torch.randn(16, 16, generator=g))  # torch.mm(x2d, W.permute(1, 0))
        self.head = torch.nn.Linear(16, 40)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.b(torch.relu(self.a(h)))
        h = torch.matmul(h, self.stored_in_out)
        h = h @ self.transposed.transpose(0, 1)
        h = torch.mm(h.reshape(-1, 16), self.permuted.permute(1, 0)).reshape(h.shape)
        return self.head(h)


def test_every_form_of_projection_becomes_a_linear_with_the_same_output():
    model = _Projections().double().eval()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    gm = canonicalize_linears(capture(model, (ids,)))
    assert counts(gm)["canonicalize_linears"] == 5
    assert len(linear_nodes(gm)) == 6
    assert not any(n.target in (torch.ops.aten.matmul.default, torch.ops.aten.mm.default) for n in gm.graph.nodes)
    assert [n for n in linear_nodes(gm) if n.args[1].target == "a.weight"][0].args[2].target == "a.bias"  # folded
    assert gm.meta["qfx"]["transposed"] == ["stored_in_out"]
    torch.testing.assert_close(gm(ids), model(ids), rtol=1e-12, atol=1e-12)  # exact up to summation order


class _Shared(torch.nn.Module):
    """One weight read by two products (left alone), and optionally an ordinary linear."""

    def __init__(self, with_linear: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 16)
        self.w = torch.nn.Parameter(torch.randn(16, 16))
        self.up = torch.nn.Linear(16, 16) if with_linear else None
        self.head = torch.nn.Linear(16, 40)

    def forward(self, ids):
        h = self.emb(ids)
        h = h @ self.w.T + h @ self.w
        return self.head(self.up(h) if self.up is not None else h)


def test_a_shared_weight_is_reported_never_silently_kept():
    import qfx

    ids = torch.randint(0, 40, (2, 5))
    with pytest.warns(UserWarning, match=r"1 of 3 projection weights stay in full precision.*matmul reads w\)"):
        q = qfx.quantize(_Shared(with_linear=True).eval(), "rtn w8 g0", example_inputs=(ids,), progress=False)
    assert q.meta["qfx"]["total_linears"] == 3 and counts(q)["quantize_linears"] == 1
    with pytest.raises(qfx.QuantizeError, match=r"no projection could be quantized: .*matmul reads w\)"):
        qfx.quantize(_Shared(with_linear=False).eval(), "rtn w8 g0", example_inputs=(ids,), progress=False)


def test_coverage_counts_every_projection_and_says_why_each_is_left(token_ids):
    import warnings

    import qfx
    from qfx.coverage import projections

    model = tiny_model("llama", tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unrecognised: no warning
        prepared = qfx.prepare(model, "rtn w8 g0 rule:down_proj=skip")
        found = {p.path: p.status for p in projections(prepared)}
        q = qfx.convert(prepared)
    assert q.meta["qfx"]["total_linears"] == len(found) == 7 * 2 + 1
    assert found["lm_head"] == "head"
    assert [s for p, s in found.items() if "down_proj" in p] == ["skipped", "skipped"]
    assert sum(s == "quantized" for s in found.values()) == counts(q)["quantize_linears"] == 12
