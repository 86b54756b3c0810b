import pytest
import torch
import transformers as T

from qfx.capture import capture
from qfx.stages import split_stages


def _run(stages, ids):
    env = {"input_ids": ids}
    for s in stages:
        env.update(zip(s.outputs, s.module(*[env[n] for n in s.inputs])))
    return env


@pytest.mark.parametrize("config", [
    T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2),
    T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=64),
], ids=["llama", "opt"])
def test_stages_in_order_compute_the_graph(config):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    gm = capture(model)
    stages = split_stages(gm)
    n_blocks = config.num_hidden_layers
    assert [s.name for s in stages][0] == "prefix" and stages[-1].name == "suffix"
    assert len(stages) == n_blocks + 2
    ids = torch.randint(0, 64, (2, 7))
    env = _run(stages, ids)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    (logits_node,) = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    torch.testing.assert_close(env[logits_node.name], gm(ids), rtol=0, atol=0)
    # each block reads one hidden state from the block before it, and shares tensors with gm
    block = stages[2].module
    (q,) = [n for n in block.graph.nodes if n.op == "get_attr" and n.target.endswith("q_proj.weight")]
    assert getattr(block, q.target.replace(".", "_"), None) is None
    assert block.get_parameter(q.target) is gm.get_parameter(q.target)


def test_blocks_that_do_not_run_in_order_make_one_stage_with_a_warning():
    from tests.architectures import tiny_model_of

    model = tiny_model_of("dory")  # loops: its recurrent blocks run again after later ones
    gm = capture(model)
    with pytest.warns(UserWarning, match="reads a value of the later block .* as one stage"):
        stages = split_stages(gm)
    assert [s.name for s in stages] == ["whole model"]
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    (logits_node,) = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    torch.testing.assert_close(_run(stages, ids)[logits_node.name], gm(ids), rtol=0, atol=0)
