import pytest

from qfx.config import ConfigError, LayerRule, QuantSpec, Recipe, act_spec, weight_spec


def test_parse_weight_only_group():
    r = Recipe.parse("rtn w4 g64 asym")
    assert r.methods == ("rtn",)
    assert r.weight == QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64)
    assert r.act is None


@pytest.mark.parametrize("group", ["g0", "g-1"])
def test_group_zero_and_minus_one_mean_per_channel(group):
    r = Recipe.parse(f"w8 {group} a8")
    assert r.weight.granularity == "channel" and r.weight.group_size is None
    assert r.act == act_spec(8) and r.act.granularity == "token" and r.act.dynamic


def test_parse_fp8_static_clip_and_rules():
    r = Recipe.parse("rtn fp8 a-static")
    assert r.weight.dtype == "fp8" and r.act.dtype == "fp8" and not r.act.dynamic
    r = Recipe.parse("rtn w3 g32 clip0.9 rule:down_proj=w8.g0 rule:lm_head=w6 rule:layers\\.0\\.=skip")
    assert r.weight.clip_ratio == 0.9
    assert r.resolve("model.layers.3.mlp.down_proj", False)[0] == weight_spec(8, 0)
    assert r.resolve("lm_head", True)[0] == weight_spec(6, 128)
    assert r.resolve("model.layers.0.self_attn.q_proj", False) == (None, None)
    assert r.resolve("model.layers.1.self_attn.q_proj", False)[0].bits == 3


def test_parse_activation_clip_ratio():
    r = Recipe.parse("quarot,gptq w4 g0 a4 a-clip0.9")
    assert r.act.clip_ratio == 0.9 and r.act.dynamic and r.weight.clip_ratio == 1.0
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ConfigError, match="activations are not quantized"):
        Recipe.parse("w4 a-clip0.9")
    with pytest.raises(ConfigError, match="fp8 activations are not clipped"):
        Recipe.parse("fp8 a-clip0.9")
    with pytest.raises(ConfigError, match="not understood"):
        Recipe.parse("w4 a4 a-clip1.5")


def test_head_kept_in_full_precision_unless_asked():
    r = Recipe.parse("w4")
    assert r.resolve("lm_head", is_head=True) == (None, None)
    assert r.resolve("lm_head", is_head=False)[0] is not None  # only the graph's head is special
    assert Recipe(weight=weight_spec(4), quantize_head=True).resolve("lm_head", True)[0] is not None


def test_w16_a16_mean_not_quantized():
    r = Recipe.parse("w16 a8 rule:q_proj=w4")
    assert r.weight is None and r.act is not None


@pytest.mark.parametrize(
    "text, message",
    [
        ("gptq9 w4", "unknown method"),
        ("w9", "2..8 bits"),
        ("w1", "2..8 bits"),
        ("w4 gx", "not understood"),
        ("w4 g-5", "group size"),
        ("w4 a8 bogus", "not understood"),
        ("w4 kv9", "2..8 bits"),
        ("quarot,spinquant w4", "one rotation method"),
        ("spinquant w4 spin-steps0", r"spinquant.steps=0 \(spin-steps\): must be >= 1"),
        ("spinquant w4 spin-linear", "'spin-linear' not understood"),
        ("gptq w4 damp0.1 damp0.2", "sets one thing twice: 'damp0.1' and 'damp0.2'"),
        ("w4 rule:down_proj", "rule:REGEX=SPEC"),
        ("w4 rule:(=w8", "not a valid regex"),
        ("", "empty recipe"),
        ("w16 a16", "quantizes nothing"),
        ("w8 g0 a8 kv8 g16", r"sets one thing twice: 'g0' and 'g16'.*kv-gN"),
        ("w4 sym asym", "sets one thing twice: 'sym' and 'asym'"),
        ("w4 kv8 kv4", "sets one thing twice: 'kv8' and 'kv4'"),
        ("gptq w4 act-order no-act-order", "sets one thing twice"),
        ("smoothquant w8 a8 sq-alpha0.3 sq-alpha-search", "sets one thing twice"),
    ],
)
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.parse(text)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=9), "bits=9"),
        (dict(granularity="group", group_size=0), "group_size=0"),
        (dict(granularity="group", group_size=None), "group_size=None"),
        (dict(granularity="channel", group_size=64), "only applies"),
        (dict(dtype="fp8", bits=4), "fp8"),
        (dict(dtype="fp8", bits=8, symmetric=False, granularity="channel", group_size=None), "symmetric"),
        (dict(clip_ratio=0.0), "clip_ratio"),
        (dict(granularity="token", group_size=None), "dynamic=True"),
        (dict(observer="magic"), "observer"),
        (dict(dtype="int3"), "dtype"),
    ],
)
def test_impossible_specs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec(**kwargs)


def test_asymmetric_activations_are_refused():
    with pytest.raises(ConfigError, match="symmetric"):
        Recipe(act=QuantSpec(bits=8, symmetric=False, granularity="token", group_size=None, dynamic=True))


def test_recipe_dict_round_trip():
    r = Recipe.parse("rtn w4 g64 asym a8 rule:down_proj=w8 rule:lm_head=skip")
    assert Recipe.from_dict(r.to_dict()) == r
    r2 = Recipe(rules=(LayerRule("o_proj", act=None),))
    assert Recipe.from_dict(r2.to_dict()) == r2


def test_scale_dtype_option():
    assert Recipe.parse("w4 g64 scale-model").weight.scale_dtype == "model"
    assert Recipe.parse("w4 g64").weight.scale_dtype == "float32"
    with pytest.raises(ConfigError, match="scale_dtype"):
        QuantSpec(scale_dtype="half")


def test_gptq_options():
    r = Recipe.parse("gptq w4 g128 damp0.05")
    assert r.methods == ("gptq",) and r.weight_method == "gptq" and r.gptq.damp == 0.05 and r.gptq.act_order
    assert not Recipe.parse("gptq w4 no-act-order").gptq.act_order
    assert Recipe.parse("w4").weight_method == "rtn"
    with pytest.raises(ConfigError, match="damp"):
        Recipe.parse("gptq w4 damp1.5")


def test_kv_rotation_and_spinquant_tokens_round_trip():
    r = Recipe.parse("spinquant,gptq w4 g-1 a4 kv4 kv-g32 rot-seed3 spin-steps20 spin-lr0.5 spin-batch2")
    assert r.methods == ("spinquant", "gptq") and r.weight_method == "gptq"
    assert (r.kv.bits, r.kv.symmetric, r.kv.granularity, r.kv.group_size) == (4, False, "group", 32)
    assert (r.rotation.seed, r.spinquant.steps, r.spinquant.lr, r.spinquant.batch) == (3, 20, 0.5, 2)
    assert Recipe.from_dict(r.to_dict()) == r
    from qfx import options

    # the method settings, as tokens again
    assert options.tokens({g: getattr(r, g) for g in options.GROUPS}) == ["rot-seed3", "spin-steps20", "spin-lr0.5",
                                                                          "spin-batch2"]
    assert Recipe.parse("w16 kv8").kv.granularity == "token"  # KV cache alone is a recipe


def test_rotation_path_needs_a_rotation_method():
    import dataclasses

    with pytest.raises(ConfigError, match="no rotation method"):
        dataclasses.replace(Recipe.parse("gptq w4"), rotation_path="r.safetensors")


def test_recipes_saved_with_flat_method_settings_still_load():
    """Before the per-method groups a recipe was saved with flat keys; those checkpoints load."""
    flat = {"methods": ["spinquant", "gptq"], "weight": None, "act": None, "kv": {"bits": 4, "symmetric": False,
            "granularity": "token", "group_size": None, "dynamic": True}, "rules": [], "damp": 0.03,
            "act_order": False, "sink_weight": 4.0, "smooth_alpha": None, "gptaq_alpha": 0.5, "search_samples": 8,
            "rotation_seed": 2, "rotation_path": None, "spin_steps": 20, "spin_lr": 0.5, "spin_batch": 2,
            "spin_schedule": "linear", "spin_weights": "rtn", "spin_estimator": "ste"}
    r = Recipe.from_dict(flat)
    assert (r.gptq.damp, r.gptq.act_order, r.gptq.sink_weight, r.gptq.range_search) == (0.03, False, 4.0, False)
    assert (r.smoothquant.alpha, r.gptaq.alpha, r.awq.search_samples) == (None, 0.5, 8)
    assert (r.rotation.seed, r.spinquant.steps, r.spinquant.lr, r.spinquant.batch) == (2, 20, 0.5, 2)


def test_every_method_setting_is_one_field_that_parses_prints_and_has_a_flag():
    """Each setting of qfx.options round-trips through its token, its CLI flag and the docs table."""
    import dataclasses
    from pathlib import Path

    from qfx import options
    from qfx.cli import build_parser, recipe_string

    for group, f in options.settings():
        value = (not f.default) if f.type in (bool, "bool") else (f.default + 1 if f.type in (int, "int") else f.default * 2)
        groups = {g: getattr(Recipe(), g) for g in options.GROUPS}
        groups[group] = dataclasses.replace(groups[group], **{f.name: value})
        (token,) = options.tokens(groups)
        assert getattr(getattr(Recipe.parse(f"gptq w4 {token}"), group), f.name) == value, token
        flag = f.metadata["flag"] if f.type not in (bool, "bool") else "--no-" + f.metadata["token"]
        argv = ["quantize", "--method", "gptq", flag] + ([] if f.type in (bool, "bool") else [str(value)])
        assert recipe_string(build_parser().parse_args(argv)).endswith(token), flag
    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    assert options.option_table() in docs, "docs/recipes.md: regenerate its table with qfx.options.option_table()"
