"""Quantization math: packing is exact, round trips stay within half a step, and the codes
agree with torchao's affine quantization primitives (an independent implementation)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfx import primitives as P

bits_st = st.integers(2, 8)
# shapes that are not multiples of 8 (packing) nor of the group size
dims = st.integers(1, 70)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, rows=st.integers(1, 5), k=dims, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_is_exact(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = P.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, P.packed_width(k, bits))
    assert torch.equal(P.unpack(packed, bits, k), codes)


def test_pack_layout_for_4_bits_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert P.pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_pack_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        P.pack(torch.zeros(2, 8, dtype=torch.int32), 4)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, sym=st.booleans(), n=st.integers(1, 6), k=dims, group=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_weight_round_trip_within_half_step(bits, sym, n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    scale, zero = P.weight_qparams(w, bits, sym, group)
    assert scale.shape == (n, math.ceil(k / group))
    codes = P.quantize_weight(w, scale, zero, bits, group)
    assert codes.shape == (n, k) and int(codes.max()) < (1 << bits)
    deq = P.dequantize_weight(codes, scale, zero, bits, group)
    step = P.from_groups(scale.unsqueeze(-1).expand(-1, -1, group), k)
    err = (deq - w).abs()
    # neither rule clips its range's ends, so rounding is the only error
    bound = step * 0.5 * (1 + 1e-5) + 1e-6
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_codes_match_torchao_affine(bits, sym):
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 128, generator=g)
    group = 32
    scale, zero = P.weight_qparams(w, bits, sym, group)
    ours = P.quantize_weight(w, scale, zero, bits, group)
    qmin, qmax = P.qrange(bits, sym)
    if sym:
        zp = torch.zeros_like(scale, dtype=torch.int32)
        signed = quantize_affine(w, (1, group), scale, zp, torch.int8, qmin, qmax)
        theirs = signed.to(torch.int16) + (1 << (bits - 1))
        deq = dequantize_affine(signed, (1, group), scale, zp, torch.int8, qmin, qmax)
    else:
        zp = zero.to(torch.int32)
        theirs = quantize_affine(w, (1, group), scale, zp, torch.uint8, qmin, qmax)
        deq = dequantize_affine(theirs, (1, group), scale, zp, torch.uint8, qmin, qmax)
    # torchao rounds x * (1/s), qfx x / s: the two may differ only where x/s is a .5 tie
    # (e.g. -amax/s = -7.5 exactly in the symmetric case), and then by one code
    ratio = w / P.from_groups(scale.unsqueeze(-1).expand(-1, -1, group), 128)
    ties = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4
    diff = ours.to(torch.int16) - theirs.to(torch.int16)
    assert bool((diff[~ties] == 0).all())
    assert int(diff.abs().max()) <= 1
    same = (diff == 0)
    ours_deq = P.dequantize_weight(ours, scale, zero, bits, group)
    torch.testing.assert_close(ours_deq[same], deq[same], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_scales_match_torchao_choose_qparams(bits, sym):
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    g = torch.Generator().manual_seed(100 + bits)
    w = torch.randn(6, 96, generator=g) * torch.rand(6, 1, generator=g)
    w[0, :32] = w[0, :32].abs()  # a group with no negative value (range widened to 0)
    w[1, 32:64] = -w[1, 32:64].abs()  # ... and one with no positive value
    scale, zero = P.weight_qparams(w, bits, sym, 32)
    qmin, qmax = P.qrange(bits, sym)
    mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if sym else MappingType.ASYMMETRIC
    s_ao, z_ao = choose_qparams_affine(w, mapping, (1, 32), torch.int8 if sym else torch.uint8, qmin, qmax,
                                       eps=1e-12, scale_dtype=torch.float32)
    torch.testing.assert_close(scale, s_ao.reshape(6, 3), rtol=1e-6, atol=0)
    if not sym:  # torchao keeps the zero point unrounded until it quantizes; qfx stores it rounded
        torch.testing.assert_close(zero.float(), z_ao.reshape(6, 3).float().round().clamp(qmin, qmax), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_scale_puts_both_ends_on_codes_without_clipping(bits):
    qmin, qmax = P.qrange(bits, True)
    lo, hi = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([1.0, 3.0, 2.0])
    scale, _ = P.choose_qparams(lo, hi, bits, True)
    torch.testing.assert_close(scale, torch.maximum(-lo / -qmin, hi / qmax))
    x = torch.stack([lo, hi], -1)  # (3, 2)
    codes = P.quantize(x, scale.unsqueeze(-1), None, bits)
    deq = P.dequantize(codes, scale.unsqueeze(-1), None, bits)
    # the end that sets the scale is exact; the other is inside the range, within half a step
    assert bool(((deq - x).abs() <= scale.unsqueeze(-1) * 0.5 + 1e-6).all())
    assert bool((deq.abs().amax(-1) >= x.abs().amax(-1) - 1e-6).all())


def test_short_last_group_uses_its_own_range():
    # K=576 (SmolLM2's hidden size) with groups of 128: four full groups and one of 64
    w = torch.randn(3, 576)
    w[:, 512:] *= 100  # only the last (short) group is large
    scale, _ = P.weight_qparams(w, 4, True, 128)
    assert scale.shape == (3, 5)
    assert bool((scale[:, 4] > 20 * scale[:, :4].max(dim=1).values).all())


def test_clip_ratio_shrinks_the_range():
    w = torch.randn(4, 64)
    s1, _ = P.weight_qparams(w, 4, True, 64, clip_ratio=1.0)
    s2, _ = P.weight_qparams(w, 4, True, 64, clip_ratio=0.5)
    torch.testing.assert_close(s2, s1 * 0.5)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 6), k=dims, seed=st.integers(0, 2**31 - 1))
def test_per_token_activation_quant_bound(bits, rows, k, seed):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 5
    q, s = P.quantize_per_token(x, bits)
    assert q.dtype == torch.int8 and s.shape == (rows, 1)
    assert bool(((q.float() * s - x).abs() <= s * 1.0 + 1e-6).all())


def test_fp8_round_trip_relative_error():
    x = torch.randn(16, 64) * 10
    scale = P.fp8_scale(x.abs().amax(-1, keepdim=True))
    y = P.fp8_quantize(x, scale).float() * scale
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
    big = x.abs() > scale * 2**-6
    assert bool(((y - x).abs()[big] <= x.abs()[big] * 2**-4 + 1e-6).all())


def test_choose_qparams_always_contains_zero():
    scale, zero = P.choose_qparams(torch.tensor(2.0), torch.tensor(5.0), 4, symmetric=False)
    assert int(zero) == 0  # range widened to [0, 5]
    assert math.isclose(float(scale), 5.0 / 15, rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym", [True, False])
def test_representable_scale_is_held_exactly_and_never_worse_than_rounding(dtype, sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 8, 32, generator=g) * 0.02  # (rows, groups, group size)
    importance = torch.rand(1, 8, 32, generator=g) + 0.1
    scale, zero = P.choose_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), 4, sym)
    best = P.representable_scale(w, scale, zero, 4, dtype, importance)

    def err(s):
        return ((w - P.dequantize(P.quantize(w, s, zero, 4), s, zero, 4)) ** 2 * importance).sum(-1, keepdim=True)

    assert torch.equal(best.to(dtype).float(), best)
    nearest = scale.to(dtype).float()
    assert (err(best) <= err(nearest)).all()
    assert (err(best) < err(nearest)).any()  # the search finds better scales than rounding somewhere
    assert ((best - scale).abs() <= 4 * (nearest - scale).abs().clamp(min=scale * 2.0 ** -8)).all()  # a neighbour
