import pytest

from qfx.capture import capture
from qfx.config import ConfigError, Recipe
from qfx.passes import counts
from qfx.passes.annotate_linears import annotate_linears, plans


def test_plans_every_linear_but_the_head(llama):
    gm = annotate_linears(capture(llama), Recipe.parse("w4 g32"))
    planned = [p.path for _, p in plans(gm)]
    assert counts(gm)["annotate_linears"] == 14 and "lm_head" not in planned
    down = next(p for _, p in plans(gm) if p.path.endswith("layers.1.mlp.down_proj"))
    assert (down.out_features, down.in_features) == (64, 96) and not down.is_head


def test_head_is_found_from_data_flow_even_when_renamed(llama):
    # the head is the linear whose output reaches the graph output: not found by its name
    gm = annotate_linears(capture(llama), Recipe.parse("w4 rule:^lm_head$=w8"))
    head = [p for _, p in plans(gm) if p.is_head]
    assert [p.path for p in head] == ["lm_head"] and head[0].weight.bits == 8


def test_rules_skip_and_override(llama):
    gm = annotate_linears(capture(llama), Recipe.parse("w4 rule:layers\\.0\\.=skip rule:down_proj=w8"))
    by_path = {p.path: p for _, p in plans(gm)}
    assert not any(".layers.0." in p for p in by_path)
    assert by_path["model.layers.1.mlp.down_proj"].weight.bits == 8
    assert by_path["model.layers.1.mlp.up_proj"].weight.bits == 4


def test_mixing_fp8_and_int_is_refused_naming_the_layer(llama):
    from qfx.config import LayerRule, act_spec, weight_spec

    recipe = Recipe(weight=weight_spec(8, 0), act=act_spec(8), rules=(LayerRule("up_proj", act=act_spec(8, fp8=True)),))
    with pytest.raises(ConfigError, match="up_proj.*fp8"):
        annotate_linears(capture(llama), recipe)
