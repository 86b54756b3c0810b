"""The same pipeline on a CUDA device (runs where a GPU is present; CI machines have none)."""

import pytest
import torch

import qfx
from qfx.eval import perplexity
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sqnr(ref, x):
    return float(20 * torch.log10(ref.float().norm() / (x.float() - ref.float()).norm()))


@pytest.mark.parametrize("recipe", ["w4 g32 asym", "w8 g0 a8", "fp8", "gptq w4 g32 sym"])
def test_quantize_on_cuda_matches_cpu(recipe, tmp_path):
    calib = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(9))
    cpu_q = qfx.quantize(tiny_model("llama"), recipe, calib=calib, progress=False)
    cuda_q = qfx.quantize(tiny_model("llama").cuda(), recipe, calib=[c.cuda() for c in calib], progress=False)
    assert next(cuda_q.buffers()).is_cuda
    with torch.no_grad():
        out = cuda_q(ids.cuda())
        assert out.is_cuda
        # same codes up to rounding ties (different matmul kernels); in GPTQ a tie that rounds the
        # other way feeds back into the later columns and blocks, on 64 calibration tokens strongly
        assert _sqnr(cpu_q(ids), out.cpu()) > (20 if recipe.startswith("gptq") else 30)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    assert perplexity(cuda_q, windows, device="cuda", progress=False) == pytest.approx(
        perplexity(cpu_q, windows, progress=False), rel=0.01)


def test_compiled_save_load_on_cuda(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    q = qfx.quantize(model, "w4 g32 asym")
    ids = torch.randint(0, 128, (2, 11), device="cuda")
    with torch.no_grad():
        eager = q(ids)
        compiled = torch.compile(q, backend="qfx")(ids)
        assert _sqnr(eager, compiled) > 30
        qfx.save(q, tmp_path / "ck")
        assert torch.equal(qfx.load(tmp_path / "ck", device="cuda")(ids), eager)


def test_tuner_times_the_gpu_work_of_a_call():
    from qfx.lowering.kernels.tuning import graph_time_ms

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    small = graph_time_ms([lambda: a[:64] @ a[:64].T], flush)
    big = graph_time_ms([lambda: a @ a], flush)  # 2 x 4096^3 flops: hundreds of µs on any recent GPU
    four = graph_time_ms([lambda: a @ a] * 4, None)
    assert 0 < small < big
    assert 3.0 < four / big < 5.0


def _replays_match_eager(q, ids, tol):
    """q compiled with the qfx backend and CUDA graphs, run for warm-up, recording and replays,
    gives eager's logits within tol."""
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="qfx", options={"triton.cudagraphs": True})
    with torch.no_grad():
        eager = q(ids)
        for _ in range(4):  # warm-up, record, replays
            out = compiled(ids)
    torch.testing.assert_close(out.float(), eager.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("recipe", ["w4 g32 asym", "w8 g0 a8"])
def test_split_k_kernels_under_compiled_cuda_graphs(recipe, monkeypatch):
    # every kernel call split over K (the last program of each tile adds up the partials), in a
    # model compiled with CUDA graphs and replayed: the split-K counters must not be allocated
    # in the graph's memory pool, and must be back at zero after every replay
    from qfx.lowering.kernels import act_quant_gemm, split_k, wint_a16
    from qfx.lowering.kernels.tuning import Config

    monkeypatch.setattr(split_k, "_counters", {})  # as in a fresh process
    monkeypatch.setenv("QFX_TUNE", "0")  # the first candidate runs
    monkeypatch.setattr(wint_a16, "candidates", lambda m, g, k: [Config(1 if m == 1 else 16, 32, 32, 4,
                                                                         variant="gemv" if m == 1 else "scaled")])
    monkeypatch.setattr(act_quant_gemm, "candidates", lambda *args, **kwargs: [Config(16, 32, 32, 4)])
    q = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16).cuda(), recipe)
    _replays_match_eager(q, torch.randint(0, 128, (1, 1), device="cuda"), tol=2e-2)
    assert torch.count_nonzero(split_k.counters(torch.device("cuda", 0))) == 0


@pytest.mark.parametrize("recipe", ["quarot w8 g0 a8", "fp8"])
def test_tuned_kernels_under_compiled_cuda_graphs(recipe, monkeypatch, tmp_path):
    # configs timed on first use (the GEMMs, the rotation pass's launch, FP8's cuBLAS candidate
    # at M = 32 > 16), inside a model compiled with CUDA graphs: the timing must happen before
    # capture and the replays must match eager
    monkeypatch.setenv("QFX_CACHE_DIR", str(tmp_path))  # nothing tuned yet
    from qfx.lowering.kernels import tuning

    monkeypatch.setattr(tuning, "_memory", {})
    q = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16).cuda(), recipe,
                     calib=[torch.randint(0, 128, (1, 32), device="cuda")], progress=False)
    _replays_match_eager(q, torch.randint(0, 128, (1, 32), device="cuda"), tol=5e-2)
    assert list(tmp_path.glob("tuning-*.json"))
