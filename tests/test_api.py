import pytest
import torch

import qfx
from qfx.api import QuantizeError
from qfx.config import ConfigError
from qfx.observers import ObserverError
from qfx.passes import counts


def _calib(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def test_prepare_calibrate_convert_matches_quantize(llama, token_ids):
    prepared = qfx.prepare(llama, "rtn w4 g32 a8 a-static")
    assert qfx.needs_calibration(prepared)
    qfx.calibrate(prepared, _calib(), progress=False)
    q1 = qfx.convert(prepared)
    q2 = qfx.quantize(llama, "rtn w4 g32 a8 a-static", calib=_calib(), progress=False)
    with torch.no_grad():
        assert torch.equal(q1(token_ids), q2(token_ids))
    assert counts(q1)["quantize_linears"] == 14


def test_quantize_is_deterministic(llama, token_ids):
    a = qfx.quantize(llama, "w4 g16 asym")
    b = qfx.quantize(llama, "w4 g16 asym")
    with torch.no_grad():
        assert torch.equal(a(token_ids), b(token_ids))


def test_original_model_is_left_untouched(llama, token_ids):
    with torch.no_grad():
        before = llama(input_ids=token_ids, use_cache=False).logits.clone()
        qfx.quantize(llama, "w2 g8 asym")
        assert torch.equal(llama(input_ids=token_ids, use_cache=False).logits, before)


@pytest.mark.parametrize("text, floor_db", [("w8 g0 a8", 25.0), ("w4 g16 a8", 10.0), ("fp8", 20.0), ("w8 g0", 30.0)])
def test_quantized_logits_sqnr_floor(llama, token_ids, text, floor_db):
    q = qfx.quantize(llama, text)
    with torch.no_grad():
        ref = llama(input_ids=token_ids, use_cache=False).logits
        sqnr = 20 * torch.log10(ref.norm() / (q(token_ids) - ref).norm())
    assert float(sqnr) > floor_db


def test_static_recipe_without_calibration_is_refused(llama):
    with pytest.raises(ConfigError, match="needs calibration"):
        qfx.quantize(llama, "w8 a8 a-static")


def test_model_without_linears_is_refused():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    with pytest.raises(QuantizeError, match="no linear layers"):
        qfx.prepare(NoLinear(), "w4", example_inputs=(torch.randn(2, 3),))


def test_nan_in_calibration_activations_is_refused(llama):
    prepared = qfx.prepare(llama, "w8 a8 a-static")
    with torch.no_grad():
        llama_embed = prepared.get_submodule("model.embed_tokens")
        llama_embed.weight[3] = float("nan")
    with pytest.raises(ObserverError, match="non-finite.*layers.0"):
        qfx.calibrate(prepared, [torch.tensor([[3, 4, 5]])], progress=False)


def test_convert_needs_a_prepared_graph(llama):
    with pytest.raises(QuantizeError, match="qfx.prepare"):
        qfx.convert(qfx.capture(llama))


def test_plain_module_quantizes():
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x = torch.randn(4, 32)
    q = qfx.quantize(m, "w8 g0", example_inputs=(x,))
    # the last linear feeds the output: it is the "head" and stays in full precision by default
    assert counts(q)["quantize_linears"] == 1
    torch.testing.assert_close(q(x), m(x), rtol=0.05, atol=0.05)


def test_gptq_beats_rtn_on_held_out_tokens(llama):
    g = torch.Generator().manual_seed(11)
    calib = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(4)]
    held_out = torch.randint(0, 128, (4, 32), generator=g)
    gptq = qfx.quantize(llama, "gptq w3 g16 asym", calib=calib, progress=False)
    rtn = qfx.quantize(llama, "rtn w3 g16 asym")
    assert counts(gptq)["quantize_linears"] == 14
    with torch.no_grad():
        ref = llama(input_ids=held_out, use_cache=False).logits
        err_gptq = (gptq(held_out) - ref).norm()
        err_rtn = (rtn(held_out) - ref).norm()
    assert err_gptq < 0.9 * err_rtn


def test_gptq_needs_calibration(llama):
    with pytest.raises(ConfigError, match="needs calibration"):
        qfx.quantize(llama, "gptq w4 g32")
