import pytest
import torch

import qfx  # noqa: F401  (registers backend "qfx")
from qfx.lowering.backend import qfx_op_count


def test_backend_is_registered_on_import():
    assert "qfx" in torch._dynamo.list_backends()


def test_compiled_matches_eager_on_cpu(llama, token_ids):
    q = qfx.quantize(llama, "w4 g32 asym a8")
    assert qfx_op_count(q) == 14
    compiled = torch.compile(q, backend="qfx")
    with torch.no_grad():
        eager = q(token_ids)
        out = compiled(token_ids)
    # float32 model: Inductor's fused CPU code reorders float sums; activation rounding can
    # move by one code where x/s sits on a tie, so allow small absolute differences
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


def test_bf16_intermediates_round_as_in_eager():
    """Inductor keeps fused bf16 intermediates in float32 unless told to emulate eager's casts;
    the backend turns that on, so quantizers downstream see eager's inputs bit for bit."""
    def chain(x):  # products only: no multiply-add to contract, no quotient to take as a reciprocal
        y = x * 1.37
        return (y * y) * 2.9

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton code on CUDA, C++ on CPU
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    eager = chain(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(chain, backend="qfx")(x), eager)
    torch._dynamo.reset()  # the option is the user's to turn off, and it is what made the difference
    off = torch.compile(chain, backend="qfx", options={"emulate_precision_casts": False})(x)
    assert not torch.equal(off, eager)


@pytest.mark.parametrize("recipe", ["w4 g32 asym kv4", "w8 g0 a8 kv8 kv-g16"])
def test_kv_quantization_compiles_into_inductor_kernels(recipe, token_ids):
    """`qfx::quantize_kv` is handed to Inductor as its reference math, fused with its neighbours
    (one generated kernel on CUDA), not called as an opaque op on every forward."""
    from torch._inductor.utils import run_and_get_code

    from tests.conftest import tiny_model

    q = qfx.quantize(tiny_model("llama"), recipe, progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = q(token_ids)
        out, code = run_and_get_code(torch.compile(q, backend="qfx"), token_ids)
    assert "torch.ops.qfx.quantize_kv" not in "\n".join(code)
    # float32: Inductor may order the group min/max and the sums differently; a cached value on
    # a rounding tie can move by one code
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def _spy(options):
    """A backend that runs "qfx" with `options` and keeps what it recorded."""
    from qfx.lowering.backend import qfx_backend

    seen = []

    def backend(gm, example_inputs):
        compiled = qfx_backend(gm, example_inputs, options)
        seen.append(gm.meta["qfx"])
        return compiled

    return backend, seen


@pytest.mark.parametrize("recipe,lowered", [("w4 g32 asym", 14), ("w8 g0 a8", 14), ("w4 g32 sym a8", 14),
                                            ("fp8", 14), ("w4 g32 asym a8", 0), ("w8 g0 a8 a-clip0.9", 0)])
def test_kernels_lowering_matches_eager(recipe, lowered, token_ids):
    """kernels="on" runs the Triton kernels (under the interpreter without a GPU)."""
    from tests.conftest import tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16).to(device), recipe)
    token_ids = token_ids.to(device)
    backend, seen = _spy({"kernels": "on"})
    with torch.no_grad():
        eager = q(token_ids)
        out = torch.compile(q, backend=backend)(token_ids)
    assert seen[0]["lowered"] == lowered
    if lowered == 0:  # no kernel (asymmetric weights or clipped int8 activations): decomposed instead
        assert ("clip ratio" if "a-clip" in recipe else "symmetric") in seen[0]["unsupported"][0]
    rel = float((out.float() - eager.float()).norm() / eager.float().norm())
    assert rel < 2e-2  # bf16 logits; kernels and reference accumulate in different orders


def test_compile_quantizes_on_the_fly(token_ids):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    backend, seen = _spy({"recipe": "w4 g32 asym", "kernels": "off"})
    with torch.no_grad():
        expected = qfx.quantize(model, "w4 g32 asym")(token_ids)
        out = torch.compile(model, backend=backend)(token_ids).logits
    assert seen[0]["quantized_on_the_fly"] == 14  # 7 per layer, head left in full precision
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_on_the_fly_refuses_recipes_that_need_calibration(token_ids):
    from tests.conftest import tiny_model

    for recipe, word in [("gptq w4 g32", "gptq.*calibration"), ("w8 a8 a-static", "static"),
                         ("quarot w8 g0 a8", "quarot"), ("smoothquant w8 g0 a8", "smoothquant")]:
        backend, _ = _spy({"recipe": recipe})
        with pytest.raises(Exception, match=word):
            torch.compile(tiny_model("llama"), backend=backend)(token_ids)


@pytest.mark.parametrize("recipe,kv", [("w4 g32 sym", "kv4"), ("w8 g0 a8", "kv8 kv-g16")])
def test_on_the_fly_quantizes_the_kv_cache(recipe, kv, token_ids):
    """The KV part of an on-the-fly recipe is applied, as qfx.quantize applies it."""
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    backend, seen = _spy({"recipe": f"{recipe} {kv}"})
    torch._dynamo.reset()
    with torch.no_grad():
        expected = qfx.quantize(model, f"{recipe} {kv}", progress=False)(token_ids)
        without_kv = qfx.quantize(model, recipe, progress=False)(token_ids)
        out = torch.compile(model, backend=backend)(token_ids).logits
    assert seen[0]["quantized_on_the_fly"] == 14
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, without_kv, rtol=1e-4, atol=1e-4)  # the KV part changed something


@pytest.mark.parametrize("recipe", ["w4 g32 asym", "w8 g0 a8", "fp8"])
def test_sibling_fusion_is_exact(recipe, token_ids):
    """q,k,v and gate,up become one launch each; with the same kernel config per launch (no
    tuning under the interpreter) every output column is computed as before, bit for bit."""
    from tests.conftest import tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", dtype=torch.bfloat16, attention_bias=True).to(device)
    q = qfx.quantize(model, recipe)
    token_ids = token_ids.to(device)
    outs, seen = [], []
    for fuse in (False, True):
        torch._dynamo.reset()
        backend, s = _spy({"kernels": "on", "fuse_siblings": fuse})
        with torch.no_grad():
            outs.append(torch.compile(q, backend=backend)(token_ids))
        seen += s
    assert "fused" not in seen[0]
    assert (seen[1]["fused"], seen[1]["fused_into"]) == (10, 4)  # per layer: q,k,v -> 1 and gate,up -> 1
    if device == "cpu":
        assert torch.equal(outs[0], outs[1])
    else:  # split-K partials may be added in another order
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("recipe,fused,alone", [("quarot w8 g0 a8", 2, 4), ("quarot w4 g32 sym a8 kv8", 2, 4),
                                                ("quarot fp8", 2, 4), ("quarot w4 g32 asym", 0, 6)])
def test_online_rotations_lowered_and_fused(recipe, fused, alone, token_ids):
    """Per layer: R4 (before down) feeding an int8/fp8-activation linear is taken into its GEMM;
    otherwise (a weight-only down) it runs on its own kernel, as R3 on queries and keys does."""
    from tests.conftest import tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", dtype=torch.bfloat16, intermediate_size=192).to(device)  # 192 = 12 x 16
    q = qfx.quantize(model, recipe, progress=False)
    token_ids = token_ids.to(device)
    backend, seen = _spy({"kernels": "on"})
    with torch.no_grad():
        eager = q(token_ids)
        out = torch.compile(q, backend=backend)(token_ids)
    assert (seen[0]["rotations_fused"], seen[0]["rotations_lowered"]) == (fused, alone)
    assert not [u for u in seen[0]["unsupported"] if "hadamard" in u]
    rel = float((out.float() - eager.float()).norm() / eager.float().norm())
    # bf16 logits; fp8 codes are 1/8 apart, so one code moved where the bf16 sums differ moves
    # more: with kernels off (Inductor's decomposition) fp8 differs from eager by 2.5e-2 here
    assert rel < (3e-2 if "fp8" in recipe else 2e-2)


def test_quantized_lm_head_runs_on_a_kernel(token_ids):
    """`rule:lm_head=w8` quantizes the head (the largest matrix a decode step reads in a small
    model); the backend lowers it like any other quantized linear."""
    from tests.conftest import tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16).to(device), "w4 g32 asym rule:lm_head=w8",
                     progress=False)
    backend, seen = _spy({"kernels": "on"})
    with torch.no_grad():
        eager = q(token_ids.to(device))
        out = torch.compile(q, backend=backend)(token_ids.to(device))
    assert seen[0]["backend_qfx_ops"] == seen[0]["lowered"] == 15  # 7 per layer and the head
    assert not seen[0]["unsupported"]
    assert float((out.float() - eager.float()).norm() / eager.float().norm()) < 2e-2


def test_qfx_imports_without_triton():
    """Triton is a test extra, not a dependency (the CPU wheel of torch does not bring it): the
    package, its backend and the reference ops import without it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, qfx\n"
            "assert 'qfx' in torch._dynamo.list_backends()\n"
            "from qfx.lowering.kernel_op import quantize_rows_ref\n"
            "q, s = quantize_rows_ref(torch.randn(3, 8), False)\n"
            "assert q.dtype == torch.int8 and s.shape == (3,)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
