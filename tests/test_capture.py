import pytest
import torch

from qfx.capture import CaptureError, capture
from qfx.graph import decoder_blocks, linear_nodes, module_path
from tests.conftest import tiny_configs, tiny_model

EXPECTED_LINEARS = {"llama": 15, "mistral": 15, "qwen2": 15, "gemma": 15, "phi3": 9, "opt": 13, "gpt2": 1}
BLOCKS = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("arch", sorted(tiny_configs()))
def test_capture_each_architecture(arch, token_ids):
    model = tiny_model(arch)
    gm = capture(model)
    with torch.no_grad():
        expected = model(input_ids=token_ids, use_cache=False).logits
        assert torch.equal(gm(token_ids), expected)
        # dynamic batch and sequence: other shapes run without re-capture
        short = token_ids[:1, :3]
        assert torch.equal(gm(short), model(input_ids=short, use_cache=False).logits)
    # GPT-2's Conv1D projections are addmm until canonicalize_linears (tests/passes)
    assert len(linear_nodes(gm)) == EXPECTED_LINEARS[arch]
    blocks = decoder_blocks(gm)
    if arch != "gpt2":
        prefix = BLOCKS.get(arch, "model.layers")
        assert [b.path for b in blocks] == [f"{prefix}.0", f"{prefix}.1"]
        assert all(p.startswith(blocks[0].path + ".") for p in blocks[0].linears)
    assert gm.meta["qfx"]["source"]["kind"] == "hf_causal_lm"


def test_module_paths_and_parameter_names_are_kept(llama):
    gm = capture(llama)
    paths = [module_path(n) for n in linear_nodes(gm)]
    assert paths[0] == "model.layers.0.self_attn.q_proj" and paths[-1] == "lm_head"
    assert linear_nodes(gm)[0].args[1].target == "model.layers.0.self_attn.q_proj.weight"


def test_capture_in_a_dtype_records_it(llama):
    gm = capture(llama, dtype=torch.bfloat16)
    src = gm.meta["qfx"]["source"]
    assert src["dtype"] == "bfloat16"
    assert src["tensor_dtypes"]["model.layers.0.mlp.up_proj.weight"] == "bfloat16"


def test_capture_plain_module():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    m = MLP()
    x = torch.randn(3, 8)
    gm = capture(m, (x,))
    assert torch.equal(gm(x), m(x))
    assert [module_path(n) for n in linear_nodes(gm)] == ["up", "down"]
    assert decoder_blocks(gm) == []


def test_plain_module_needs_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(torch.nn.Linear(2, 2))


def test_uncapturable_model_names_the_problem():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)
            if h.sum() > 0:  # Python branch on a tensor's value: not capturable as one graph
                return h * 2
            return h

    with pytest.raises(CaptureError, match="could not capture DataDependent"):
        capture(DataDependent(), (torch.randn(2, 4),))
