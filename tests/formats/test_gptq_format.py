"""GPTQ-format export against an unpacker written here from the format's description."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qfx
from qfx.formats import ExportError
from qfx.ops import dequantize_packed
from tests.conftest import tiny_model


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits):
    """w[n, k] = (q[k, n] - (z[g_idx[k], n] + 1)) * scales[g_idx[k], n], v1 GPTQ layout."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    qw = qweight.to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(qw >> (bits * i)) & mask for i in range(per_word)], dim=1)  # (K/pw, pw, N)
    q = q.reshape(-1, qweight.shape[1])  # (K, N): row k = pw*word + i
    qz = qzeros.to(torch.int64) & 0xFFFFFFFF
    z = torch.stack([(qz >> (bits * i)) & mask for i in range(per_word)], dim=2).reshape(qzeros.shape[0], -1)
    g = g_idx.long()
    w = (q - (z[g] + 1)).float() * scales[g].float()  # (K, N)
    return w.t()


@pytest.mark.parametrize("recipe, bits, group", [("w4 g32 sym", 4, 32), ("w4 g0 asym", 4, -1),
                                                 ("w8 g0 sym", 8, -1), ("w2 g16 sym", 2, 16)])
def test_unpacking_reproduces_qfx_weights_exactly(recipe, bits, group, tmp_path):
    model = tiny_model("mistral", dtype=torch.float16)
    qmodel = qfx.quantize(model, recipe + " scale-model")
    qfx.export(qmodel, tmp_path / "g", format="gptq")
    config = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["desc_act"]) == (bits, group, False)
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == config
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        t = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(path + ".")}
        assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
        mod = qmodel.get_submodule(path)
        k = t["g_idx"].numel()
        ours = dequantize_packed(mod.qweight, mod.w_scale, getattr(mod, "w_zero", None), bits,
                                 0 if group == -1 else group, k)
        theirs = gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
        assert torch.equal(theirs, ours)
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors


def test_zero_point_of_zero_is_refused_not_wrapped(tmp_path):
    # v1 stores zero - 1: a group whose values are all >= 0 has zero point 0, which would wrap
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5].abs_()
    qmodel = qfx.quantize(model, "w4 g0 asym")
    with pytest.raises(ExportError, match="up_proj: a zero point of 0"):
        qfx.export(qmodel, tmp_path / "g", format="gptq")
    assert list(tmp_path.iterdir()) == []


def test_gptq_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(ExportError, match="weight-only"):
        qfx.export(qfx.quantize(tiny_model("llama"), "w4 g16 a8"), tmp_path / "a", format="gptq")
    with pytest.raises(ExportError, match="one weight spec"):
        qfx.export(qfx.quantize(tiny_model("llama"), "w4 g16 rule:down_proj=w8"), tmp_path / "b", format="gptq")
    with pytest.raises(ExportError, match="int"):
        qfx.export(qfx.quantize(tiny_model("llama"), "w3 g16"), tmp_path / "c", format="gptq")
    assert list(tmp_path.iterdir()) == []
