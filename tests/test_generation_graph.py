"""The generation graph gives the full-sequence graph's logits, token by token.

Teacher forcing: a prefill of the first tokens into an empty cache, then the rest one token at
a time; the logits of every position must be those of the full-sequence graph (or of the
Hugging Face model itself when nothing is quantized), float32.
"""

import pytest
import torch

import qfx
from qfx.generation_graph import generation_graph
from qfx.passes import counts
from tests.conftest import tiny_configs, tiny_model

ARCHS = list(tiny_configs())
TOL = 1e-5  # float32 relative to the largest logit; the paths differ only in summation order
# Recipes that quantize activations per token at run time round the attention output to int8
# codes: a summation-order difference of ~1e-7 in it moves a value across a rounding boundary
# now and then, which changes that code by one step (about 1 % of a token's range) and the
# logits by up to a few 1e-3. Their bound is that of one flipped code, not of summation order.
TOL_A8 = 2e-2


def teacher_forced(graph, ids: torch.Tensor, prefill: int, length: int) -> torch.Tensor:
    b, s = ids.shape
    positions = torch.arange(s).expand(b, s)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :prefill] = True
    with torch.no_grad():
        out = [graph(ids[:, :prefill], positions[:, :prefill], torch.arange(prefill), mask)]
        for t in range(prefill, s):
            mask[:, t] = True
            out.append(graph(ids[:, t:t + 1], positions[:, t:t + 1], torch.tensor([t]), mask))
    return torch.cat(out, 1)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_model(arch, ids):
    model = tiny_model(arch)
    graph = generation_graph(model, 2, 12)
    assert counts(graph)["attach_kv_cache"] == 2  # one per layer
    with torch.no_grad():
        full = model(ids).logits
    assert rel_err(teacher_forced(graph, ids, 4, 12), full) <= TOL


@pytest.mark.parametrize("arch, recipe", [(a, r) for a in ARCHS for r in ("w4 g32 asym kv4", "quarot w4 g-1 kv4")]
                         + [("llama", "w4 g16 sym kv8 kv-g8"), ("gpt2", "w4 g16 sym kv8 kv-g8")])
def test_quantized_model(arch, recipe, ids):
    qmodel = qfx.quantize(tiny_model(arch), recipe, progress=False)
    graph = generation_graph(qmodel, 2, 12)
    assert counts(graph)["quantize_linears"] == counts(qmodel)["quantize_linears"]
    assert counts(graph)["attach_kv_cache"] == 2
    assert all(layer.kv_bits in (4, 8) for layer in graph.kv_cache.children())  # stored as codes
    with torch.no_grad():
        full = qmodel(ids)
    assert rel_err(teacher_forced(graph, ids, 4, 12), full) <= TOL


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("recipe", ["w8 g-1 a8", "quarot w4 g-1 a8 kv4"])
def test_recipes_with_per_token_activation_codes(arch, recipe, ids):
    qmodel = qfx.quantize(tiny_model(arch), recipe, progress=False)
    graph = generation_graph(qmodel, 2, 12)
    with torch.no_grad():
        full = qmodel(ids)
    assert rel_err(teacher_forced(graph, ids, 4, 12), full) <= TOL_A8


def test_calibrated_model_and_its_checkpoint_give_the_same_graph(tmp_path, ids):
    calib = [torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(3))]
    qmodel = qfx.quantize(tiny_model("qwen2"), "gptq w4 g32 kv4", calib=calib, progress=False)
    qfx.save(qmodel, tmp_path / "m")
    direct = teacher_forced(generation_graph(qmodel, 2, 12), ids, 3, 12)
    reloaded = teacher_forced(generation_graph(qfx.load(tmp_path / "m"), 2, 12), ids, 3, 12)
    assert torch.equal(direct, reloaded)
    with torch.no_grad():
        assert rel_err(direct, qmodel(ids)) <= TOL


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_imported_folder(fmt, tmp_path, ids):
    qmodel = qfx.quantize(tiny_model("llama"), "w4 g32 sym scale-model", progress=False)
    qfx.export(qmodel, tmp_path / "m", format=fmt)
    imported = qfx.load(tmp_path / "m")
    with torch.no_grad():
        full = imported(ids)
    assert rel_err(teacher_forced(generation_graph(imported, 2, 12), ids, 4, 12), full) <= TOL


def test_chunked_prefill_into_a_filled_cache(ids):
    """Prefill in two chunks (the second attends over the first's slots) = one prefill."""
    qmodel = qfx.quantize(tiny_model("llama"), "w4 g32 asym kv4", progress=False)
    graph = generation_graph(qmodel, 2, 12)
    positions = torch.arange(9).expand(2, 9)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        first = graph(ids[:, :5], positions[:, :5], torch.arange(5), mask)
        mask[:, 5:9] = True
        second = graph(ids[:, 5:], positions[:, 5:], torch.arange(5, 9), mask)
        full = qmodel(ids)
    assert rel_err(torch.cat([first, second], 1), full) <= TOL


def test_refusals_name_the_problem():
    from qfx.capture import capture
    from qfx.passes.attach_kv_cache import CacheError, attach_kv_cache

    with pytest.raises(CacheError, match="capture_for_cache"):
        attach_kv_cache(capture(tiny_model("llama")), 1, 8)
    with pytest.raises(CacheError, match="Hugging Face causal LM"):
        generation_graph(torch.nn.Linear(4, 4), 1, 8)
    with pytest.raises(CacheError, match="at least one row"):
        generation_graph(tiny_model("llama"), 0, 8)
    with pytest.raises(CacheError, match="sliding window of 8 tokens"):
        generation_graph(tiny_model("mistral", sliding_window=8), 1, 12)
    eager = tiny_model("llama", attn_implementation="eager")
    eager.config._attn_implementation = "eager"
    with pytest.raises(CacheError, match="scaled_dot_product_attention"):
        generation_graph(eager, 1, 8)
