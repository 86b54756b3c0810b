"""qfx::quantized_linear against a dense computation written here from the format's definition."""

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qfx  # noqa: F401  (registers the op)
from qfx import primitives as P
from qfx.ops import NO_ACT_QUANT, quantized_linear


def _dense_weight(codes, scale, zero, bits, group):
    # (u - z) * s with each scale repeated over its group, the last group possibly short
    k = codes.shape[1]
    s = scale.repeat_interleave(group, dim=1)[:, :k]
    z = float(1 << (bits - 1)) if zero is None else zero.float().repeat_interleave(group, dim=1)[:, :k]
    return (codes.float() - z) * s


def _random_op_inputs(n, k, bits, group, sym, seed):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8)
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    zero = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=g).to(torch.uint8)
    return codes, scale, zero


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 33), k=st.integers(1, 70), m=st.integers(1, 5), bits=st.integers(2, 8),
       group=st.integers(1, 80), sym=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_weight_only_matches_dense(n, k, m, bits, group, sym, seed):
    codes, scale, zero = _random_op_inputs(n, k, bits, group, sym, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    y = quantized_linear(x, P.pack(codes, bits), scale, zero, bias, bits, group, k, NO_ACT_QUANT, None)
    ref = x @ _dense_weight(codes, scale, zero, bits, group).double().T + bias
    # float64 input: the only rounding is the float32 weight dequantization
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("a_bits", [8, 4])
def test_dynamic_per_token_activation_quant(a_bits):
    codes, scale, zero = _random_op_inputs(16, 40, 4, 16, True, 0)
    x = torch.randn(3, 40)
    y = quantized_linear(x, P.pack(codes, 4), scale, zero, None, 4, 16, 40, a_bits, None)
    qmax = (1 << (a_bits - 1)) - 1
    s = x.abs().amax(-1, keepdim=True) / (qmax + 0.5)
    xq = torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
    torch.testing.assert_close(y, xq @ _dense_weight(codes, scale, zero, 4, 16).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_bits", [8, 4])
def test_activation_clip_ratio_shrinks_each_tokens_range(a_bits):
    codes, scale, zero = _random_op_inputs(16, 40, 4, 16, True, 0)
    x = torch.randn(3, 40)
    x[0, 5] = 12.0  # an outlier that saturates once clipped
    y = quantized_linear(x, P.pack(codes, 4), scale, zero, None, 4, 16, 40, a_bits, None, 0.9)
    qmax = (1 << (a_bits - 1)) - 1
    s = 0.9 * x.abs().amax(-1, keepdim=True) / (qmax + 0.5)
    xq = torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
    assert float(xq[0, 5]) < 0.9 * 12.0  # saturated
    torch.testing.assert_close(y, xq @ _dense_weight(codes, scale, zero, 4, 16).T, rtol=1e-5, atol=1e-5)
    unclipped = quantized_linear(x, P.pack(codes, 4), scale, zero, None, 4, 16, 40, a_bits, None)
    assert not torch.allclose(y, unclipped)


def test_static_activation_scale_and_per_channel():
    codes, scale, zero = _random_op_inputs(8, 24, 8, 24, False, 3)
    x = torch.randn(5, 24)
    a_scale = torch.tensor(0.02)
    y = quantized_linear(x, P.pack(codes, 8), scale, zero, None, 8, 0, 24, 8, a_scale)
    xq = torch.clamp(torch.round(x / 0.02), -128, 127) * 0.02
    torch.testing.assert_close(y, xq @ _dense_weight(codes, scale, zero, 8, 24).T, rtol=1e-5, atol=1e-5)


def test_fp8_weights_and_activations():
    w = torch.randn(12, 32)
    ws = P.fp8_scale(w.abs().amax(-1, keepdim=True))
    qw = P.fp8_quantize(w, ws)
    x = torch.randn(4, 32)
    y = quantized_linear(x, qw, ws, None, None, 8, 0, 32, 8, None)
    xs = x.abs().amax(-1, keepdim=True) / 448.0
    xq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    torch.testing.assert_close(y, xq @ (qw.float() * ws).T, rtol=1e-5, atol=1e-5)


def test_output_dtype_follows_input_and_opcheck_passes():
    codes, scale, zero = _random_op_inputs(8, 20, 4, 8, False, 1)
    args = (torch.randn(2, 3, 20, dtype=torch.bfloat16), P.pack(codes, 4), scale.bfloat16(), zero, None, 4, 8, 20,
            NO_ACT_QUANT, None)
    assert quantized_linear(*args).dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.qfx.quantized_linear.default, args)


def _kv_reference(x, bits, group):
    """Loop over every (token, head, group): min-max asymmetric round trip."""
    out = torch.empty_like(x, dtype=torch.float32)
    d = x.shape[-1]
    g = group or d
    qmax = 2**bits - 1
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape[:-1]]):
        row = x[tuple(idx)].float()
        for s in range(0, d, g):
            v = row[s:s + g]
            lo, hi = min(v.min().item(), 0.0), max(v.max().item(), 0.0)
            scale = max((hi - lo) / qmax, 1e-12)
            zero = min(max(round(-lo / scale), 0), qmax)
            q = torch.clamp(torch.round(v / scale) + zero, 0, qmax)
            out[tuple(idx)][s:s + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits,group", [(4, 0), (8, 0), (4, 4), (2, 6)])
def test_quantize_kv_matches_a_per_token_head_group_loop(bits, group):
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(bits + group))
    got = torch.ops.qfx.quantize_kv(x, bits, group)
    torch.testing.assert_close(got, _kv_reference(x, bits, group), rtol=0, atol=1e-6)
    assert got.dtype == x.dtype and got.shape == x.shape


def test_hadamard_op_matches_dense_and_has_a_gradient():
    from qfx.algorithms.hadamard import hadamard_dense

    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    y = torch.ops.qfx.hadamard(x)
    h = hadamard_dense(48)
    torch.testing.assert_close(y, x @ h, rtol=0, atol=1e-12)
    (y * torch.arange(48.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, (torch.arange(48.0, dtype=torch.float64) @ h.T).expand(3, 48),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("a_bits,static", [(8, False), (4, False), (8, True)])
def test_symmetric_per_channel_int_path_is_exact(a_bits, static):
    # per-channel symmetric int weights with int activations: an int32 GEMM, then the scales
    codes, scale, _ = _random_op_inputs(24, 48, 8, 48, True, 5)
    x = torch.randn(2, 3, 48)
    a_scale = torch.tensor(0.03) if static else None
    y = quantized_linear(x, P.pack(codes, 8), scale, None, None, 8, 0, 48, a_bits, a_scale)
    if static:
        qx, sx = P.quantize_per_tensor_static(x, a_scale, a_bits), a_scale
    else:
        qx, sx = P.quantize_per_token(x, a_bits)
    exact = (qx.double() @ (codes.double() - 128).T) * sx.double() * scale.double().T
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-6)  # float32 rounding of the scaling only


def test_cpu_weight_cache_is_exact_and_follows_in_place_changes():
    from qfx import ops
    codes, scale, zero = _random_op_inputs(16, 40, 4, 8, False, 2)
    qweight, x = P.pack(codes, 4), torch.randn(3, 40)
    with torch.no_grad():
        first = quantized_linear(x, qweight, scale, zero, None, 4, 8, 40, NO_ACT_QUANT, None)
        assert qweight in ops._DEQUANTIZED
        again = quantized_linear(x, qweight, scale, zero, None, 4, 8, 40, NO_ACT_QUANT, None)
        scale.mul_(2)
        doubled = quantized_linear(x, qweight, scale, zero, None, 4, 8, 40, NO_ACT_QUANT, None)
        other_zero = quantized_linear(x, qweight, scale, torch.zeros_like(zero), None, 4, 8, 40, NO_ACT_QUANT, None)
    uncached = x @ _dense_weight(codes, scale / 2, zero, 4, 8).T
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(doubled, 2 * first, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other_zero, x @ _dense_weight(codes, scale, torch.zeros_like(zero), 4, 8).T)
    cached = weakref.ref(ops._DEQUANTIZED[qweight][1])
    del qweight
    gc.collect()
    assert cached() is None  # the entry went with its weight
