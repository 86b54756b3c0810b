"""Triton kernels against their plain-PyTorch references, on random inputs.

On a machine without a GPU these run under TRITON_INTERPRET=1 (set in conftest) at small
sizes; with a GPU they run compiled. Shapes include M, N, K that are not multiples of the
block sizes, and K that is not a multiple of the group size.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qfx import primitives as P
from qfx.lowering.kernels.act_quant_gemm import act_quant_linear, act_quant_ref
from qfx.lowering.kernels import split_k
from qfx.lowering.kernels.layout import dequantize_kernel_weight, kernel_weight, pack_words, unpack_words
from qfx.lowering.kernels.tuning import Config
from qfx.lowering.kernels.wint_a16 import wint_a16_linear, wint_a16_ref
from qfx.ops import dequantize_packed
from qfx.quantizer import quantize_weight_tensors
from qfx.config import QuantSpec, weight_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_weight(n, k, bits, group, sym, fp8=False, int8_rows=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    spec = (QuantSpec(bits=8, dtype="fp8", granularity="channel", group_size=None) if fp8
            else weight_spec(bits, group_size=group, symmetric=sym))
    t = quantize_weight_tensors(w, spec)
    args = (t["qweight"], t["w_scale"], t.get("w_zero"), 8 if fp8 else bits, 0 if fp8 else group, k)
    kw = kernel_weight(*[a.to(DEVICE) if torch.is_tensor(a) else a for a in args], int8_rows=int8_rows)
    return kw, args


def rand_x(m, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("container", [2, 4, 8])
def test_pack_words_round_trip(container):
    codes = torch.randint(0, 1 << container, (5, 37), dtype=torch.uint8)
    words = pack_words(codes, container)
    assert words.dtype == torch.int32 and words.shape == (-(-37 // (32 // container)), 5)
    assert torch.equal(unpack_words(words, container, 37), codes)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, True), (8, 0, True), (2, 16, False)])
def test_kernel_layout_dequantizes_like_the_op(bits, group, sym):
    kw, args = make_weight(24, 100, bits, group, sym)
    assert torch.equal(dequantize_kernel_weight(kw).cpu(), dequantize_packed(*args))


def test_int8_rows_and_fp8_layouts_dequantize_like_the_op():
    for fp8, rows in [(True, False), (False, True)]:
        kw, args = make_weight(24, 100, 8, 0, True, fp8=fp8, int8_rows=rows)
        assert kw.layout == "rows"
        assert torch.equal(dequantize_kernel_weight(kw).cpu(), dequantize_packed(*args))


# tolerance: kernel and reference round the same bf16/fp16 products; they differ only in the
# order of float32 accumulation and in the final rounding to x's dtype
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 32, True), (8, 0, True), (3, 64, False),
                                            (2, 32, True), (8, 128, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["tiled", "scaled", "swapped-tiled", "swapped-scaled"])
def test_wint_a16_matches_reference(bits, group, sym, dtype, variant):
    kw, _ = make_weight(80, 200, bits, group, sym)
    x = rand_x(19, 200, dtype)
    bias = torch.randn(80).to(dtype).to(DEVICE)
    out = wint_a16_linear(x, kw, bias, config=Config(16, 32, 64, variant=variant))
    assert rel_err(out, wint_a16_ref(x, kw, bias)) < TOL[dtype]


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (3, 32, False), (2, 32, True),
                                            (8, 0, False), (8, 64, True)])
@pytest.mark.parametrize("variant", ["tiled-once", "scaled", "swapped-scaled-once", "swapped-tiled"])
def test_wint_a16_unpacks_every_code_exactly(bits, group, sym, variant):
    # x = the identity and power-of-two scales: y = W^T, each value (u - z) s exact in bf16 and
    # every sum has one nonzero term, so the kernel must return the dequantized weights bit for
    # bit; any code or zero point unpacked wrong (a shift, a mask, the multiply-add) shows
    kw, _ = make_weight(64, 128, bits, group, sym)
    g = torch.Generator().manual_seed(3)
    pow2 = 2.0 ** torch.randint(-6, -2, kw.scale.shape, generator=g)
    kw = dataclasses.replace(kw, scale=pow2.to(kw.scale.device))
    x = torch.eye(128, dtype=torch.bfloat16, device=DEVICE)
    out = wint_a16_linear(x, kw, config=Config(16, 64, 32, variant=variant))
    assert torch.equal(out, dequantize_kernel_weight(kw).T.to(torch.bfloat16))


@pytest.mark.parametrize("cfg", [Config(16, 32, 32, split_k=3), Config(32, 64, 64, split_k=2), Config(16, 16, 16),
                                 Config(16, 32, 32, split_k=3, variant="tiled-once"),
                                 Config(32, 64, 64, variant="tiled-once"),
                                 Config(16, 32, 32, split_k=3, variant="scaled"),
                                 Config(32, 64, 64, variant="scaled-once"),
                                 Config(16, 32, 32, split_k=3, variant="swapped-scaled-once"),
                                 Config(32, 64, 64, variant="swapped-tiled-once")])
def test_wint_a16_split_k_and_tiles(cfg):
    kw, _ = make_weight(72, 160, 4, 32, False)
    x = rand_x(5, 160, torch.bfloat16)
    out = wint_a16_linear(x.view(1, 5, 160), kw, config=cfg)
    assert out.shape == (1, 5, 72) and out.dtype == torch.bfloat16
    assert rel_err(out.view(5, 72), wint_a16_ref(x, kw)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("run", [
    lambda kw, x: wint_a16_linear(x, kw, config=Config(16, 32, 32, split_k=3)),
    lambda kw, x: wint_a16_linear(x[:1], kw, config=Config(1, 16, 32, 4, variant="gemv")),
    lambda kw, x: act_quant_linear(x, kw, config=Config(16, 32, 32, split_k=3))])
def test_split_k_leaves_its_counters_at_zero(run):
    # the last program of each tile resets the tile's counter: a second call (and any other
    # split call after it) starts from zero and gives the same result
    kw, _ = make_weight(72, 160, 4, 32, True)
    x = rand_x(5, 160, torch.bfloat16)
    first = run(kw, x)
    assert torch.count_nonzero(split_k.counters(first.device)) == 0
    assert torch.equal(run(kw, x), first)
    assert rel_err(first, wint_a16_ref(x[: first.shape[0]], kw)) < 0.05  # W4A8 rounds x to int8 too


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 128, True), (8, 0, False), (3, 48, False),
                                            (2, 32, True)])
@pytest.mark.parametrize("cfg", [Config(1, 32, 64, 1, variant="gemv"), Config(1, 16, 128, 2, variant="gemv"),
                                 Config(1, 16, 32, 8, variant="gemv"), Config(16, 32, 0, variant="dequant")])
# K = 256: every K step of the gemv is whole (no bounds on K); fp16 x is read one value at a time
@pytest.mark.parametrize("k,dtype", [(290, torch.bfloat16), (256, torch.bfloat16), (256, torch.float16)])
def test_wint_a16_gemv_and_dequant_variants(bits, group, sym, cfg, k, dtype):
    kw, _ = make_weight(72, k, bits, group, sym)
    bias = torch.randn(72).to(dtype).to(DEVICE)
    for m in (1, 3):  # gemv applies to one row; other M fall back to the tiled kernel
        x = rand_x(m, k, dtype, seed=m)
        out = wint_a16_linear(x, kw, bias, config=cfg)
        assert rel_err(out, wint_a16_ref(x, kw, bias)) < TOL[dtype]


@pytest.mark.parametrize("variant", ["tiled", "scaled", "swapped-scaled"])
def test_wint_a16_fp8_weights(variant):
    kw, _ = make_weight(48, 96, 8, 0, True, fp8=True)
    x = rand_x(3, 96, torch.bfloat16)
    out = wint_a16_linear(x, kw, config=Config(16, 32, 32, split_k=2, variant=variant))
    assert rel_err(out, wint_a16_ref(x, kw)) < TOL[torch.bfloat16]


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k_groups=st.integers(1, 5), bits=st.sampled_from([2, 3, 4, 8]),
       sym=st.booleans(), variant=st.sampled_from(["tiled", "tiled-once", "scaled", "scaled-once"]))
def test_wint_a16_drawn_shapes(m, n, k_groups, bits, sym, variant):
    k = 32 * k_groups - 7  # a short last group
    kw, _ = make_weight(n, k, bits, 32, sym, seed=m * n)
    x = rand_x(m, k, torch.bfloat16, seed=k)
    out = wint_a16_linear(x, kw, config=Config(16, 32, 32, split_k=2, variant=variant))
    assert rel_err(out, wint_a16_ref(x, kw)) < TOL[torch.bfloat16]


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 300), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(),
       split_k=st.sampled_from([1, 3]))
def test_wint_a16_gemv_drawn_shapes(n, k, bits, sym, split_k):
    kw, _ = make_weight(n, k, bits, 32 if k > 32 else 0, sym, seed=n * k)
    x = rand_x(1, k, torch.bfloat16, seed=k)
    out = wint_a16_linear(x, kw, config=Config(1, 32, 64, split_k, variant="gemv"))
    assert rel_err(out, wint_a16_ref(x, kw)) < TOL[torch.bfloat16]


# int8 / fp8 activations: the kernel computes the same codes as the reference except where x/s
# lands within float32 rounding of a tie, so the results agree to float32 accumulation order
# plus the final rounding to x's dtype
@pytest.mark.parametrize("bits,group,rows", [(8, 0, True), (8, 0, False), (4, 64, False), (4, 0, False),
                                             (4, 32, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_activation_gemm_matches_reference(bits, group, rows, dtype):
    kw, _ = make_weight(80, 200, bits, group, True, int8_rows=rows)
    x = rand_x(19, 200, dtype)
    bias = torch.randn(80).to(dtype).to(DEVICE)
    out = act_quant_linear(x, kw, bias=bias, config=Config(16, 32, 32))
    assert rel_err(out, act_quant_ref(x, kw, bias=bias)) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["w8", "w4g64", "fp8"])
@pytest.mark.parametrize("cfg", [Config(16, 32, 64, split_k=3), Config(32, 32, 32, variant="prequant"),
                                 Config(16, 64, 32, split_k=2, variant="prequant"),
                                 # BLOCK_K above the group: cut to it for every variant
                                 Config(16, 32, 128, variant="prequant"),
                                 Config(16, 32, 128, split_k=2, variant="prequant-once"),
                                 Config(16, 32, 64, variant="tiled-once"),
                                 # y^T = W x^T
                                 Config(16, 32, 64, split_k=2, variant="swapped-prequant"),
                                 Config(32, 64, 32, variant="swapped-tiled"),
                                 Config(16, 32, 64, split_k=3, variant="swapped-prequant-once")])
def test_act_quant_split_k_and_prequant(fmt, cfg):
    kw, _ = {"w8": lambda: make_weight(56, 300, 8, 0, True, int8_rows=True),
             "w4g64": lambda: make_weight(56, 300, 4, 64, True),
             "fp8": lambda: make_weight(56, 300, 8, 0, True, fp8=True)}[fmt]()
    x = rand_x(21, 300, torch.bfloat16) * 3
    bias = torch.randn(56).to(torch.bfloat16).to(DEVICE)
    out = act_quant_linear(x, kw, bias=bias, config=cfg)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, act_quant_ref(x, kw, bias=bias)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("row_block", [None, 128])  # a whole row held at once; rows in 128-blocks, read twice
def test_quantize_rows_matches_per_token_reference(row_block, monkeypatch):
    from qfx.lowering.kernels import act_quant_gemm
    from qfx.lowering.kernels.act_quant_gemm import quantize_rows

    if row_block:
        monkeypatch.setattr(act_quant_gemm, "ROW_BLOCK", row_block)
    x = rand_x(9, 333, torch.bfloat16) * 5
    q, scale = quantize_rows(x, fp8=False)
    ref_q, ref_scale = P.quantize_per_token(x.cpu(), 8)
    torch.testing.assert_close(scale.cpu(), ref_scale.squeeze(-1), rtol=0, atol=0)
    # x * (1/s) and x / s can differ in the last bit, which moves a code only at a rounding tie
    assert (q.cpu().int() - ref_q.int()).abs().max() <= 1
    assert (q.cpu() != ref_q).float().mean() < 1e-3
    q8, scale8 = quantize_rows(x, fp8=True)
    ref8 = P.fp8_quantize(x.cpu(), P.fp8_scale(x.cpu().float().abs().amax(-1, keepdim=True)))
    assert (q8.cpu().float() != ref8.float()).float().mean() < 1e-3


def test_fp8_rowwise_gemm_matches_reference():
    kw, _ = make_weight(80, 200, 8, 0, True, fp8=True)
    x = rand_x(19, 200, torch.bfloat16) * 7
    out = act_quant_linear(x, kw, config=Config(16, 32, 32))
    assert rel_err(out, act_quant_ref(x, kw)) < TOL[torch.bfloat16]


def test_fp8_scaled_mm_candidate_matches_reference():
    """The cuBLAS candidate: row quantization, then torch._scaled_mm; with a bias, on dynamic and
    on already-quantized rows (the rotated path), and offered only where it computes the call."""
    from qfx.lowering.kernels.act_quant_gemm import candidates, launch, quantize_rows, scaled_mm_applies

    kw, _ = make_weight(80, 208, 8, 0, True, fp8=True)
    x = rand_x(19, 208, torch.bfloat16) * 7
    bias = torch.randn(80).to(torch.bfloat16).to(DEVICE)
    cfg = Config(0, 0, 0, variant="scaled_mm")
    out = act_quant_linear(x, kw, bias=bias, config=cfg)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, act_quant_ref(x, kw, bias=bias)) < TOL[torch.bfloat16]
    q, s = quantize_rows(x, fp8=True)  # what the rotated path hands over
    torch.testing.assert_close(launch(q, kw, s, bias, cfg, torch.bfloat16).float(), out.float(), rtol=0, atol=0)
    assert scaled_mm_applies(kw, None, torch.bfloat16)
    assert not scaled_mm_applies(kw, torch.tensor(0.1), torch.bfloat16)  # one static scale
    assert not scaled_mm_applies(kw, None, torch.float16)  # cuBLAS writes row-scaled results in bf16
    assert not scaled_mm_applies(make_weight(80, 200, 8, 0, True, fp8=True)[0], None, torch.bfloat16)  # K % 16
    assert not scaled_mm_applies(make_weight(80, 208, 8, 0, True, int8_rows=True)[0], None, torch.bfloat16)
    assert cfg in candidates(64, 208, 208, scaled_mm=True)
    assert cfg not in candidates(16, 208, 208, scaled_mm=True) + candidates(64, 208, 208)
    with pytest.raises(ValueError, match="scaled_mm variant"):
        act_quant_linear(x.half(), kw, config=cfg)


def test_static_activation_scale():
    kw, _ = make_weight(40, 96, 8, 0, True, int8_rows=True)
    x = rand_x(7, 96, torch.bfloat16)
    a_scale = (x.float().abs().amax() / 100).reshape(())  # some values clip at 127
    out = act_quant_linear(x, kw, a_scale=a_scale, config=Config(16, 32, 32))
    assert rel_err(out, act_quant_ref(x, kw, a_scale=a_scale)) < TOL[torch.bfloat16]


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 150))
def test_int8_activation_gemm_drawn_shapes(m, n, k):
    kw, _ = make_weight(n, k, 8, 0, True, int8_rows=True, seed=m + n)
    x = rand_x(m, k, torch.bfloat16, seed=k)
    out = act_quant_linear(x, kw, config=Config(16, 32, 32))
    assert rel_err(out, act_quant_ref(x, kw)) < TOL[torch.bfloat16]


def test_kernel_agrees_with_op_reference():
    """Through the layout: the kernel computes what `qfx::quantized_linear` computes."""
    from qfx.ops import quantized_linear_ref

    kw, args = make_weight(48, 128, 4, 64, False)
    x = rand_x(6, 128, torch.bfloat16)
    ref = quantized_linear_ref(x.cpu(), args[0], args[1], args[2], None, 4, 64, 128, 16, None)
    assert rel_err(wint_a16_linear(x, kw, config=Config(16, 32, 64)).cpu(), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 0), (2, 32)])
@pytest.mark.parametrize("cfg", [Config(1, 32, 64, 4, variant="gemv"), Config(1, 16, 128, 1, variant="gemv")])
def test_act_quant_gemv_on_int8_codes(bits, group, cfg):
    """M = 1 with packed weights: the weight-only gemv kernel on the row's int8 codes, times the
    row scale; from float x (quantized first) and from codes (quantized in a norm's kernel)."""
    from qfx.lowering.kernel_op import quantize_rows_ref

    kw, _ = make_weight(56, 300, bits, group, True)
    x = rand_x(1, 300, torch.bfloat16) * 3
    bias = torch.randn(56).to(torch.bfloat16).to(DEVICE)
    ref = act_quant_ref(x, kw, bias=bias)
    assert rel_err(act_quant_linear(x, kw, bias=bias, config=cfg), ref) < TOL[torch.bfloat16]
    codes, scales = quantize_rows_ref(x, False)
    out = act_quant_linear(codes, kw, scales, bias=bias, config=cfg, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="gemv variant"):
        act_quant_linear(rand_x(2, 300, torch.bfloat16), kw, config=cfg)
