"""The online-rotation kernel (`qfx.lowering.kernels.hadamard_rows`) against `qfx.ops.hadamard_ref`,
alone and fused with per-token activation quantization and the act-quant GEMM.

Under TRITON_INTERPRET=1 without a GPU (set in conftest); compiled on a GPU.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qfx.algorithms.hadamard import online_factors
from qfx.lowering.kernels.act_quant_gemm import act_quant_linear, act_quant_ref, quantize_rows
from qfx.algorithms.hadamard import hadamard_dense, hadamard_matrix
from qfx.lowering.kernels.hadamard_rows import (candidates, hadamard_quantize_rows, hadamard_rows, left_factor,
                                                mix_factor, supported)
from qfx.ops import hadamard_ref
from tests.lowering.test_kernels import DEVICE, make_weight, rand_x, rel_err

# sizes: powers of two (one Sylvester factor, or two: 256, 4096) and m x 2^k with m = 12, 20, 28
SIZES = [16, 64, 128, 256, 4096, 192, 1536, 640, 3584, 5120, 14336]


def _factor(n):
    m_mat, p = online_factors(n)
    return (1 if m_mat is None else m_mat.shape[0]), p


def test_size_split_covers_the_sizes_used_here():
    assert {n: _factor(n) for n in (1536, 3584, 14336)} == {1536: (12, 128), 3584: (28, 128), 14336: (28, 512)}


@pytest.mark.parametrize("n", [64, 256, 1024, 192, 1536, 3584, 188 * 16, 5120, 14336])
def test_kernel_factors_rebuild_the_rotation(n):
    """(L (x) H_Q) (x) H_C times the output scale is the reference's H_n, in float64: applied to
    random rows (never an n x n matrix: at n = 14336 that alone is 1.6 GB), and as matrices
    for the small sizes."""
    lt, scale, c, _, q = left_factor(n)
    left = torch.ones(1, 1, dtype=torch.float64) if lt is None else lt.double().T.contiguous()
    hq, hc = hadamard_matrix(q).double(), hadamard_matrix(c).double()
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    # x @ (L (x) H_Q (x) H_C): row index (i, j, k) of the Kronecker product -> column (a, b, c)
    y = torch.einsum("rijk,ia,jb,kc->rabc", x.reshape(4, left.shape[0], q, c), left, hq, hc).reshape(4, n)
    torch.testing.assert_close(y * scale, hadamard_ref(x), rtol=0, atol=1e-9 * n ** 0.5)
    if n <= 1536:
        full = torch.kron(torch.kron(left, hq), hc)
        torch.testing.assert_close(full * scale, hadamard_dense(n), rtol=0, atol=1e-6)
    if n in (3584, 1536, 1024, 5120, 14336):  # Hadamard factors: stored as +-1, exact in every dtype
        assert torch.equal(left.abs(), torch.ones_like(left))
    if n in (5120, 14336):  # 20 x 2 x 128 and 28 x 4 x 128: the block kernel, with an m x m left factor
        assert (q, left.shape[0]) == ({5120: 2, 14336: 4}[n], {5120: 20, 14336: 28}[n])


@pytest.mark.parametrize("n", SIZES)
def test_rotation_matches_reference_in_float32(n):
    x = rand_x(37, n, torch.float32)  # 37 rows: not a multiple of the rows one program holds
    mix = mix_factor(n)
    y = hadamard_rows(x, None if mix is None else mix.to(DEVICE))
    # float32 products in another order: agree to a few float32 roundings of the row's size
    torch.testing.assert_close(y, hadamard_ref(x), rtol=0, atol=2e-6 * float(x.abs().max()) * 4)


@pytest.mark.parametrize("n,dtype", [(n, d) for n in (64, 1536, 3584, 14336) for d in (torch.bfloat16, torch.float16)])
def test_rotation_in_half_precision_rounds_like_the_reference(n, dtype):
    """Both round once to x's dtype: outputs differ only where the two values before rounding
    sit on either side of a rounding boundary, by one unit in the last place, or, for values
    near zero, by the error of the sums. The interpreter sums in float32 (at most 0.5% of the
    outputs differ); a GPU takes bf16 rows' second product in TF32 (within about 2^-11 of
    float32, so more of them, up to a quarter)."""
    x = rand_x(9, n, dtype)
    mix = mix_factor(n)
    y, ref = hadamard_rows(x, None if mix is None else mix.to(DEVICE)).float(), hadamard_ref(x).float()
    assert (y != ref).float().mean() <= (5e-3 if DEVICE == "cpu" or dtype == torch.float16 else 0.25)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    atol = (1e-5 if DEVICE == "cpu" or dtype == torch.float16 else 5e-4) * float(x.abs().max())
    torch.testing.assert_close(y, ref, rtol=ulp, atol=atol)


def test_rotation_reads_strided_rows_and_keeps_leading_dims():
    x = rand_x(6, 200, torch.bfloat16)[:, 4:196].reshape(2, 3, 192)  # rows 200 apart
    y = hadamard_rows(x, mix_factor(192).to(DEVICE))
    assert y.shape == (2, 3, 192)
    torch.testing.assert_close(y.float(), hadamard_ref(x).float(), rtol=0, atol=0.05)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n", [64, 1536, 5120, 14336])  # 5120, 14336: the block kernel (Q = 2, 4)
def test_rotate_and_quantize_matches_quantizing_the_reference_rotation(n, fp8):
    x = rand_x(21, n, torch.bfloat16)
    mix = mix_factor(n)
    q, s = hadamard_quantize_rows(x, None if mix is None else mix.to(DEVICE), fp8)
    q_ref, s_ref = quantize_rows(hadamard_ref(x), fp8)
    torch.testing.assert_close(s, s_ref, rtol=1e-2, atol=0)  # the row's absmax, rounded to bf16 by both
    codes, codes_ref = q.float(), q_ref.float()
    if fp8:  # one e4m3 step at most, where the bf16 rotation rounded differently
        assert ((codes - codes_ref).abs() <= codes_ref.abs() / 8 + 2 ** -9).all()
    else:
        assert (codes - codes_ref).abs().max() <= 1
    assert (codes != codes_ref).float().mean() <= (1e-2 if DEVICE == "cpu" else 5e-2)  # TF32 on a GPU: see above


@pytest.mark.parametrize("index", range(len(candidates(4096))))
def test_every_launch_config_gives_the_same_codes(index, monkeypatch):
    """Warps, stages and programs per SM change the schedule only (on a GPU; the interpreter
    runs two programs whatever the config). 300 rows of 1536 (R = 12): several tiles a program."""
    from qfx.lowering.kernels import tuning

    x = rand_x(300, 1536, torch.bfloat16)
    mix = mix_factor(1536).to(DEVICE)
    q0, s0 = hadamard_quantize_rows(x, mix, False)
    monkeypatch.setattr(tuning, "pick", lambda key, cands, run: cands[index])
    q, s = hadamard_quantize_rows(x, mix, False)
    assert torch.equal(q, q0) and torch.equal(s, s0)


def test_sizes_without_a_kernel_are_refused_with_the_reason():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # 28 x 4 x 128: a 28 x 28 left factor
        assert supported(14336, dtype) == (True, "")
    for dtype in (torch.float32, torch.float16):  # 12288 = 12 x 8 x 128: a 96 x 96 dense factor; TF32x3 tiles hold 64
        ok, why = supported(12288, dtype)
        assert not ok and str(dtype) in why and "96 x 96" in why
    ok, why = supported(28672)  # 28 x 8 x 128: a 224 x 224 dense factor
    assert not ok and "224 x 224" in why
    with pytest.raises(ValueError, match="172 x 172"):
        hadamard_rows(rand_x(2, 11008, torch.bfloat16), None)
    ok, why = supported(11008)  # 172 x 64: a 172 x 172 dense factor
    assert not ok and "172 x 172" in why
    ok, why = supported(24)  # 12 x 2
    assert not ok and "below 16" in why


@pytest.mark.parametrize("bits,group,rows,fp8", [(8, 0, True, False), (4, 32, False, False), (8, 0, False, True)])
def test_gemm_on_rotated_activations_matches_reference(bits, group, rows, fp8):
    n, k = 40, 1536
    kw, _ = make_weight(n, k, bits, group, True, fp8=fp8, int8_rows=rows)
    x = rand_x(19, k, torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16).to(DEVICE)
    out = act_quant_linear(x, kw, None, bias, hadamard=True, mix=mix_factor(k).to(DEVICE))
    ref = act_quant_ref(x, kw, None, bias, hadamard=True)
    assert rel_err(out, ref) < 1e-2  # codes may differ by one step where the bf16 rotation rounded differently


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 40), n=st.sampled_from([16, 48, 80]), k=st.sampled_from(SIZES[:6]),
       static=st.booleans())
def test_gemm_on_rotated_activations_on_drawn_shapes(m, n, k, static):
    kw, _ = make_weight(n, k, 8, 0, True, int8_rows=True)
    x = rand_x(m, k, torch.bfloat16)
    a_scale = torch.tensor(0.05, device=DEVICE) if static else None
    mix = mix_factor(k)
    out = act_quant_linear(x, kw, a_scale, hadamard=True, mix=None if mix is None else mix.to(DEVICE))
    assert rel_err(out, act_quant_ref(x, kw, a_scale, hadamard=True)) < 1e-2
