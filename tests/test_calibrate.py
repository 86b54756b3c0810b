"""The block-by-block driver: later blocks calibrate on the quantized outputs of earlier ones,
the user's model is left alone, offloading changes nothing, and bad use is refused."""

import copy

import pytest
import torch
import transformers as T
from torch.fx import Interpreter

import qfx
from qfx.api import QuantizeError
from qfx.observers import HessianObserver


def _model():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    return T.LlamaForCausalLM(cfg).eval()


def _calib(n=3):
    return [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _inputs_of(gm, path, batches):
    """Rows reaching the op of module `path` in a converted graph, over `batches`."""
    node = next(n for n in gm.graph.nodes if getattr(n.meta.get("qfx"), "path", None) == path)
    rows = []

    class Grab(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is node:
                rows.append(self.env[n.args[0]].detach().reshape(-1, n.args[0].meta["val"].shape[-1]))
            return out

    for b in batches:
        Grab(gm).run(b)
    return torch.cat(rows).double()


def test_second_block_hessian_comes_from_the_quantized_first_block(monkeypatch):
    seen = {}
    release = HessianObserver.release

    def keep(self):
        seen[self.name] = self.hessian.detach().clone().double()
        release(self)

    monkeypatch.setattr(HessianObserver, "release", keep)
    model = _model()
    qmodel = qfx.quantize(copy.deepcopy(model), "gptq w3 g16 sink1", calib=_calib(), progress=False)
    path = "model.layers.1.self_attn.q_proj"
    x = _inputs_of(qmodel, path, _calib())
    torch.testing.assert_close(seen[path], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    # ... and not from the full-precision model's block 0
    ref = qfx.prepare(copy.deepcopy(model), "gptq w3 g16 sink1")
    for b in _calib():
        ref(b)
    fp_h = ref.get_submodule(f"{path}.hessian_observer").hessian.double()
    assert (fp_h - seen[path]).abs().max() > 1e-3 * fp_h.abs().max()


@pytest.mark.parametrize("recipe", ["smoothquant w8 g0 a8", "awq w4 g16 asym search1", "gptaq w4 g16"])
def test_user_model_is_not_modified(recipe):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qfx.quantize(model, recipe, calib=_calib(2), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reruns_give_identical_weights():
    outs = []
    for _ in range(2):
        q = qfx.quantize(_model(), "awq+ w4 g16 asym search1", calib=_calib(2), progress=False, device="cpu")
        outs.append({k: v for k, v in q.state_dict().items() if k.endswith(("qweight", "w_scale", "w_zero"))})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 0
    for other in outs[1:]:
        for k in outs[0]:
            assert torch.equal(outs[0][k], other[k]), k


def test_block_wise_methods_need_the_driver():
    prepared = qfx.prepare(_model(), "awq w4 g16")
    for b in _calib(1):
        prepared(b)
    with pytest.raises(QuantizeError, match="qfx.calibrate"):
        qfx.convert(prepared)


class _NoFold(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 16)  # the last linear stays in full precision

    def forward(self, x):
        h = self.norm(x)
        return self.head(h + self.fc(h))  # the norm output is also the residual: no exact fold


def test_unfoldable_region_is_left_unsmoothed_with_a_warning():
    torch.manual_seed(0)
    m = _NoFold()
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match=r"smoothquant: region norm -> fc left as is: .*also read by"):
        q = qfx.quantize(m, "smoothquant w8 g0 a8", calib=[x], example_inputs=(x,), progress=False)
    ref = m(x)
    assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_folded_scales_save_and_reload_exactly(tmp_path):
    q = qfx.quantize(_model(), "awq w4 g16 asym search1", calib=_calib(2), progress=False)
    qfx.save(q, tmp_path / "q")
    ids = _calib(1)[0]
    assert torch.equal(qfx.load(tmp_path / "q")(ids), q(ids))


@pytest.mark.parametrize("recipe", ["gptq w4 g16", "awq+ w4 g16 asym search2", "smoothquant w8 g0 a8"])
def test_batching_the_samples_gives_the_same_model(recipe):
    """Four samples one at a time or two by two: the same statistics (float64, so rounding in a
    different summation order cannot flip a code), and AWQ searches on the same two samples."""
    samples = torch.cat([b[:1] for b in _calib(4)])  # (4, 12)
    weights = []
    for batches in (samples.split(1), samples.split(2)):
        q = qfx.quantize(_model(), recipe, calib=batches, progress=False, dtype=torch.float64)
        weights.append({k: v for k, v in q.state_dict().items() if k.endswith(("qweight", "w_scale", "w_zero"))})
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-9, atol=0, msg=k)
