"""The norm feeding int8 / fp8-activation kernel linears writes their codes (backend pass
`quantize_in_producer`); the GEMM reads codes and row scales."""

import pytest
import torch

import qfx
from qfx.lowering.kernel_op import quantize_rows_ref
from qfx.lowering.kernels.act_quant_gemm import act_quant_linear, act_quant_ref
from qfx.lowering.kernels.tuning import Config
from tests.lowering.test_kernels import DEVICE, TOL, make_weight, rand_x, rel_err


def _compile(q, token_ids, **options):
    from torch._inductor.utils import run_and_get_code

    from qfx.lowering.backend import qfx_backend

    seen = []

    def backend(gm, example_inputs):
        compiled = qfx_backend(gm, example_inputs, {"kernels": "on", **options})
        seen.append(gm.meta["qfx"])
        return compiled

    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(q, backend=backend), token_ids)
    return out, "\n".join(code), seen[0]


@pytest.mark.parametrize("recipe", ["w8 g0 a8", "fp8", "w4 g32 sym a8", "quarot w8 g0 a8"])
def test_norm_fed_linears_read_codes_quantized_in_the_norm_kernel(recipe, token_ids):
    from tests.conftest import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16, intermediate_size=192).to(DEVICE)
    q = qfx.quantize(model, recipe, progress=False)
    token_ids = token_ids.to(DEVICE)
    with torch.no_grad():
        eager = q(token_ids)
    out, code, seen = _compile(q, token_ids)
    before, _, seen_off = _compile(q, token_ids, quantize_in_producer=False)
    # per layer: q, k, v read input_layernorm and gate, up read post_attention_layernorm (one
    # quantizer each); o_proj (attention) and down_proj (the gated product) quantize in the GEMM
    assert (seen["act_quant_in_producer"], seen["producer_quantizers"]) == (10, 4)
    assert "act_quant_in_producer" not in seen_off
    assert seen["fused_into"] == seen_off["fused_into"] == 4  # q,k,v and gate,up still one launch each
    assert "torch.ops.qfx.quantize_rows" not in code  # Inductor computes it, in the norm's kernel
    # bf16 logits; the codes are the reference quantizer's, the GEMMs accumulate in another order
    assert rel_err(out, eager) < (3e-2 if "fp8" in recipe else 2e-2)
    assert rel_err(out, before) < (3e-2 if "fp8" in recipe else 2e-2)


def test_weight_only_and_unnormed_inputs_are_left_alone(token_ids):
    from tests.conftest import tiny_model

    q = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16).to(DEVICE), "w4 g32 asym", progress=False)
    _, _, seen = _compile(q, token_ids.to(DEVICE))
    assert seen["lowered"] == 14 and seen["act_quant_in_producer"] == 0


@pytest.mark.parametrize("fp8", [False, True])
def test_quantize_rows_op_matches_reference(fp8):
    x = rand_x(2 * 9, 200, torch.bfloat16).reshape(2, 9, 200) * 5
    q, s = torch.ops.qfx.quantize_rows(x, fp8)
    ref_q, ref_s = quantize_rows_ref(x.cpu(), fp8)
    assert q.shape == x.shape and s.shape == (2, 9) and q.dtype == ref_q.dtype
    torch.testing.assert_close(s.cpu(), ref_s, rtol=0, atol=0)
    # x * (1/s) and x / s can differ in the last bit, which moves a code only at a rounding tie
    assert (q.cpu().float() != ref_q.float()).float().mean() < 1e-3


@pytest.mark.parametrize("fmt", ["w8", "w4g64", "fp8"])
@pytest.mark.parametrize("cfg", [Config(16, 32, 64), Config(16, 32, 64, split_k=2, variant="swapped-tiled")])
def test_gemm_on_codes_matches_gemm_on_floats(fmt, cfg):
    kw, _ = {"w8": lambda: make_weight(56, 300, 8, 0, True, int8_rows=True),
             "w4g64": lambda: make_weight(56, 300, 4, 64, True),
             "fp8": lambda: make_weight(56, 300, 8, 0, True, fp8=True)}[fmt]()
    x = rand_x(21, 300, torch.bfloat16) * 3
    codes, scales = quantize_rows_ref(x, kw.fp8)
    out = act_quant_linear(codes, kw, scales, config=cfg, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, act_quant_ref(x, kw)) < TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="row scales"):
        act_quant_linear(codes, kw, config=cfg)


def test_generation_graphs_read_codes_and_generate_as_eager():
    """The cached graphs (prefill with dynamic shapes, one-token decode) take the pass too and
    generate eager's greedy tokens."""
    from qfx.generate import Generator
    from qfx.lowering.backend import qfx_backend
    from tests.conftest import tiny_model

    q = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16).to(DEVICE), "w8 g0 a8", progress=False)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    eager = Generator.from_model(q, max_batch=1, max_length=32, compile=False)
    expected = eager.generate(ids, max_new_tokens=5, eos_token_id=[]).tokens
    gen = Generator.from_model(q, max_batch=1, max_length=32, compile=False)
    seen = []

    def backend(gm, example_inputs):
        compiled = qfx_backend(gm, example_inputs, {"kernels": "on"})
        seen.append(gm.meta["qfx"])
        return compiled

    torch._dynamo.reset()
    gen._decode = torch.compile(gen._decode, backend=backend, dynamic=False)
    gen._prefill = torch.compile(gen._prefill, backend=backend, dynamic=True)
    assert gen.generate(ids, max_new_tokens=5, eos_token_id=[]).tokens == expected
    assert [s["act_quant_in_producer"] for s in seen] == [10, 10]  # prefill, decode


@pytest.mark.parametrize("arch,rewritten", [("opt", 8), ("gpt2", 4), ("gemma", 10), ("phi3", 4), ("qwen2", 10)])
def test_norms_of_other_architectures_are_found(arch, rewritten, token_ids):
    """LayerNorm (OPT, GPT-2), Gemma's (1 + w) RMSNorm, fused qkv / gate_up projections (Phi-3,
    GPT-2's Conv1D): per layer, every linear that reads a norm reads codes, one quantizer per norm."""
    from tests.conftest import tiny_model

    q = qfx.quantize(tiny_model(arch, dtype=torch.bfloat16).to(DEVICE), "w8 g0 a8", progress=False)
    with torch.no_grad():
        eager = q(token_ids.to(DEVICE))
    out, _, seen = _compile(q, token_ids.to(DEVICE))
    assert (seen["act_quant_in_producer"], seen["producer_quantizers"]) == (rewritten, 4)  # 2 layers x 2 norms
    assert rel_err(getattr(out, "logits", out), getattr(eager, "logits", eager)) < 2e-2
