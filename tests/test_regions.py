"""Regions read from data flow on random-weight models of six families, and exact folding."""

import pytest
import torch
import transformers as T

from qfx.capture import capture
from qfx.regions import apply_scale, find_regions

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**SMALL, intermediate_size=48, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**SMALL, intermediate_size=48, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**SMALL, intermediate_size=48, num_key_value_heads=1),
    "gemma": lambda: T.GemmaConfig(**SMALL, intermediate_size=48, num_key_value_heads=2, head_dim=8),
    "phi3": lambda: T.Phi3Config(**SMALL, intermediate_size=48, num_key_value_heads=2, pad_token_id=0),
    "opt": lambda: T.OPTConfig(**{**SMALL, "num_hidden_layers": 2}, ffn_dim=48, word_embed_proj_dim=32,
                               max_position_embeddings=64),
}
# (producer suffix, consumer names) per block, as the family's architecture defines them
EXPECTED = {
    "llama": [("input_layernorm", "q_proj, k_proj, v_proj"), ("v_proj", "o_proj"),
              ("post_attention_layernorm", "gate_proj, up_proj"), ("up_proj", "down_proj")],
    "phi3": [("input_layernorm", "qkv_proj"), ("qkv_proj", "o_proj"),
             ("post_attention_layernorm", "gate_up_proj"), ("gate_up_proj", "down_proj")],
    "opt": [("self_attn_layer_norm", "q_proj, k_proj, v_proj"), ("v_proj", "out_proj"),
            ("final_layer_norm", "fc1"), ("fc1", "fc2")],
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["gemma"] = EXPECTED["llama"]


def _model(family):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[family]()).double().eval()
    with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma): make them generic
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
    return model


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_regions_found_from_data_flow(family):
    gm = capture(_model(family))
    blocks = [r for r in find_regions(gm) if ".layers.0." in r.producer + "."]
    got = [(r.producer.rsplit(".", 1)[-1], ", ".join(p.rsplit(".", 1)[-1] for p in r.linears)) for r in blocks]
    assert got == EXPECTED[family]
    assert all(r.fold is not None for r in blocks), [r.reason for r in blocks]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_folding_random_scales_is_exact_in_float64(family):
    """Scales in [0.25, 4) on every foldable region leave the logits unchanged (1e-10 relative)."""
    gm = capture(_model(family))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = gm(ids)
    g = torch.Generator().manual_seed(2)
    regions = [r for r in find_regions(gm) if r.fold is not None]
    assert len(regions) == 8  # 4 per block, 2 blocks
    for r in regions:
        apply_scale([gm], r, 4.0 ** (torch.rand(r.channels, generator=g, dtype=torch.float64) * 2 - 1))
    out = gm(ids)
    # Gemma's RMSNorm casts to float32 inside (x.float() * (1 + w.float())) whatever the model
    # dtype, so its graph is exact only to float32 rounding
    tol = 1e-6 if family == "gemma" else 1e-10
    assert (out - ref).abs().max() / ref.abs().max() < tol


def test_gqa_scales_are_tied_across_query_heads():
    gm = capture(_model("llama"))
    (vo,) = [r for r in find_regions(gm) if r.linears[0].endswith("layers.0.self_attn.o_proj")]
    tied = vo.tie(torch.arange(32, dtype=torch.float64))
    # 4 query heads of dim 8 on 2 kv heads: heads 0,1 share kv head 0, heads 2,3 kv head 1
    assert torch.equal(tied[:8], tied[8:16]) and torch.equal(tied[16:24], tied[24:32])
    assert torch.equal(tied[:8], torch.arange(8, dtype=torch.float64) + 4)


class _SharedNorm(torch.nn.Module):
    """The norm's output feeds a linear and the residual: no exact fold."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 8)
        self.gelu_in = torch.nn.Linear(8, 8)
        self.gelu_out = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc(h) + self.gelu_out(torch.nn.functional.gelu(self.gelu_in(x)))


def test_unfoldable_regions_say_why():
    gm = capture(_SharedNorm(), (torch.randn(2, 8),))
    by_consumer = {r.linears[0]: r for r in find_regions(gm)}
    assert by_consumer["fc"].fold is None and "also read by" in by_consumer["fc"].reason
    assert by_consumer["gelu_out"].fold is None and "gelu" in by_consumer["gelu_out"].reason
    assert by_consumer["gelu_in"].fold is None  # reads the graph input
    with pytest.raises(ValueError, match="cannot take a scale"):
        apply_scale([gm], by_consumer["fc"], torch.ones(8))


def test_gpt2_regions_through_its_conv1d_reshapes_fold_exactly():
    """GPT-2's Conv1D matmuls reach their inputs and outputs through (B*S, K) reshapes, and its
    fused c_attn is cut with aten.split: the regions see through both."""
    from qfx.passes.canonicalize_linears import canonicalize_linears

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = T.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(torch.rand_like(p) * 0.5)
    gm = canonicalize_linears(capture(model))
    block = [r for r in find_regions(gm) if ".h.0." in r.producer + "."]
    assert [(r.producer.rsplit(".", 1)[-1], r.linears[0].rsplit(".", 1)[-1], r.fold is not None) for r in block] == [
        ("ln_1", "c_attn", True), ("c_attn", "c_proj", True), ("ln_2", "c_fc", True), ("act", "c_proj", False)]
    assert block[1].fold.head_dim == 8
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = gm(ids)
    g = torch.Generator().manual_seed(2)
    for r in [r for r in find_regions(gm) if r.fold is not None]:
        apply_scale([gm], r, 4.0 ** (torch.rand(r.channels, generator=g, dtype=torch.float64) * 2 - 1))
    out = gm(ids)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-10
