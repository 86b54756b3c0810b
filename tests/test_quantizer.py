"""The one quantizer: what the searches fake-quantize is what the quantized op computes."""

import pytest
import torch

from qfx.algorithms.smoothquant import region_error
from qfx.config import QuantSpec
from qfx.ops import quantized_linear_ref
from qfx.quantizer import fake_quantize_activation, fake_quantize_weight, op_group_size, quantize_weight_tensors

WEIGHT_SPECS = {
    "w4 g32 sym": QuantSpec(bits=4, granularity="group", group_size=32, symmetric=True),
    "w4 g32 asym": QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False),
    "w8 channel clip0.9": QuantSpec(bits=8, granularity="channel", group_size=None, symmetric=True, clip_ratio=0.9),
    "w3 tensor asym": QuantSpec(bits=3, granularity="tensor", group_size=None, symmetric=False),
    "fp8": QuantSpec(bits=8, dtype="fp8", granularity="channel", group_size=None, symmetric=True),
}
ACT_SPECS = {
    "a8 token": QuantSpec(bits=8, granularity="token", group_size=None, symmetric=True, dynamic=True),
    "a4 token clip0.9": QuantSpec(bits=4, granularity="token", group_size=None, symmetric=True, dynamic=True, clip_ratio=0.9),
    "a8 static": QuantSpec(bits=8, granularity="tensor", group_size=None, symmetric=True, dynamic=False),
}


def _op(x, w, w_spec, a_spec=None, a_scale=None):
    """The quantized op itself on the tensors convert stores."""
    t = quantize_weight_tensors(w, w_spec)
    a_bits = 16 if a_spec is None else a_spec.bits
    a_clip = a_spec.clip_ratio if a_spec is not None and a_spec.dynamic else 1.0
    return quantized_linear_ref(x, t["qweight"], t["w_scale"], t.get("w_zero"), None, w_spec.bits,
                                op_group_size(w_spec), w.shape[1], a_bits, a_scale, a_clip).double()


@pytest.mark.parametrize("name", WEIGHT_SPECS)
def test_fake_weight_is_the_weight_the_op_computes_with(name):
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    x = torch.eye(96)  # the op's output on the identity is its weight, transposed
    expected = _op(x, w, WEIGHT_SPECS[name]).T
    torch.testing.assert_close(fake_quantize_weight(w, WEIGHT_SPECS[name]).double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("act", ACT_SPECS)
def test_fake_activation_and_weight_reproduce_the_op(act):
    """x (n, K) through both fake quantizers, then a float64 product, equals the op's output
    (float32 GEMM: relative 1e-5)."""
    torch.manual_seed(1)
    x, w = torch.randn(16, 64) * torch.linspace(0.1, 8, 64), torch.randn(32, 64)
    w_spec, a_spec = WEIGHT_SPECS["w4 g32 sym"], ACT_SPECS[act]
    a_scale = None
    if not a_spec.dynamic:  # the scale calibration would choose from the same rows
        from qfx.primitives import choose_qparams
        a_scale, _ = choose_qparams(x.amin(), x.amax(), a_spec.bits, symmetric=True)
    expected = _op(x, w, w_spec, a_spec, a_scale)
    got = fake_quantize_activation(x, a_spec).double() @ fake_quantize_weight(w, w_spec).double().T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["a8 token", "a4 token clip0.9"])
def test_smoothquant_search_error_is_the_error_of_the_op_it_chooses(act):
    """region_error(s) is ||op(x / s, W s) - x W^T||^2 for the op convert builds."""
    torch.manual_seed(2)
    x, w = torch.randn(32, 64) * torch.linspace(0.1, 8, 64), torch.randn(48, 64)
    s = torch.rand(64) + 0.5
    w_spec, a_spec = WEIGHT_SPECS["w8 channel clip0.9"], ACT_SPECS[act]
    direct = float((_op(x / s, w * s, w_spec, a_spec) - (x @ w.T).double()).pow(2).sum())
    assert region_error(x, [w], s, w_spec, a_spec) == pytest.approx(direct, rel=1e-5)
