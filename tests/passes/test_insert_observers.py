import torch

from qfx.capture import capture
from qfx.config import Recipe
from qfx.observers import RangeObserver
from qfx.passes import counts
from qfx.passes.annotate_linears import annotate_linears
from qfx.passes.insert_observers import insert_observers


def test_static_activations_get_one_observer_per_linear(llama, token_ids):
    recipe = Recipe.parse("w8 g0 a8 a-static")
    gm = insert_observers(annotate_linears(capture(llama), recipe), recipe)
    assert counts(gm)["insert_observers"] == 14
    observers = [m for m in gm.modules() if isinstance(m, RangeObserver)]
    assert len(observers) == 14
    with torch.no_grad():  # observers do not change the function
        assert torch.equal(gm(token_ids), llama(input_ids=token_ids, use_cache=False).logits)
    assert all(o.calls == 1 for o in observers)


def test_dynamic_and_weight_only_get_none(llama):
    for text in ("w4 g32", "w8 g0 a8"):
        recipe = Recipe.parse(text)
        gm = insert_observers(annotate_linears(capture(llama), recipe), recipe)
        assert counts(gm)["insert_observers"] == 0


def test_gptq_gets_a_hessian_observer_per_planned_linear(llama, token_ids):
    from qfx.observers import HessianObserver

    recipe = Recipe.parse("gptq w4 g32 a8 a-static")
    gm = insert_observers(annotate_linears(capture(llama), recipe), recipe)
    assert counts(gm)["insert_observers"] == 28  # range + Hessian for each of 14 linears
    hessians = [m for m in gm.modules() if isinstance(m, HessianObserver)]
    assert len(hessians) == 14
    with torch.no_grad():
        assert torch.equal(gm(token_ids), llama(input_ids=token_ids, use_cache=False).logits)
    assert all(h.n_tokens == token_ids.numel() for h in hessians)
