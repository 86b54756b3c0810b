"""compressed-tensors export, checked with the real clients: transformers (with the
compressed-tensors package) loads the folder, and the package's own compressor unpacks it."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qfx
from qfx import primitives as P
from qfx.eval import perplexity
from qfx.formats import ExportError
from qfx.formats.compressed_tensors import pack_int32, unpack_int32
from qfx.ops import dequantize_packed
from tests.conftest import tiny_model


@pytest.mark.parametrize("bits, k", [(4, 70), (8, 33), (3, 64), (2, 5)])
def test_int32_packing_matches_the_reference_packer(bits, k):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(0, 1 << bits, (6, k), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32((codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, k), codes)
    back = unpack_from_int32(ours, bits, torch.Size([6, k])).to(torch.int16) + (1 << (bits - 1))
    assert torch.equal(back.to(torch.uint8), codes)


@pytest.mark.parametrize("recipe", ["w4 g16 sym scale-model", "w8 g0 a8 scale-model", "fp8 scale-model",
                                    "w4 g0 a8 scale-model"])
def test_transformers_loads_the_folder_with_the_same_perplexity(recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    qmodel = qfx.quantize(model, recipe)
    qfx.export(qmodel, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    ppl_hf = perplexity(lambda ids: hf(input_ids=ids).logits, windows, progress=False)
    ppl_qfx = perplexity(qmodel, windows, progress=False)
    assert abs(ppl_hf - ppl_qfx) / ppl_qfx < 1e-3, (ppl_hf, ppl_qfx)


def _fake_quantized_in_model_dtype(x, qweight, w_scale, w_zero, bias, w_bits, group_size, in_features, a_bits,
                                   a_scale, a_clip=1.0):
    """W8A8 / W4A8 (symmetric per channel, per-token int8) as transformers computes it with
    compressed-tensors: scale = max|x| / 127.5 and the dequantized activations and weights in
    the model dtype, then a matmul in that dtype."""
    dt = x.dtype
    w = (P.unpack(qweight, w_bits, in_features).float() - (1 << (w_bits - 1))).to(dt) * w_scale.to(dt)
    s = x.abs().amax(-1, keepdim=True) / torch.tensor(255 / 2, dtype=dt)
    return torch.nn.functional.linear(torch.clamp(torch.round(x / s), -128, 127) * s, w, bias)


@pytest.mark.parametrize("recipe", ["w8 g0 a8 scale-model", "w4 g0 a8 scale-model"])
def test_transformers_fake_quantizes_int_activations_in_the_model_dtype(recipe, tmp_path, monkeypatch):
    # why transformers does not reproduce qfx's W8A8 exactly: it rounds q * s (up to 15
    # significant bits) to bfloat16 on both operands, where int8 GEMMs (qfx, vLLM) are exact
    from transformers import AutoModelForCausalLM

    import qfx.ops

    qmodel = qfx.quantize(tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=True), recipe)
    qfx.export(qmodel, tmp_path / "ct", format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = hf(input_ids=ids).logits, qmodel(ids)
        monkeypatch.setattr(qfx.ops, "quantized_linear_ref", _fake_quantized_in_model_dtype)
        emulated = qmodel(ids)
    assert not torch.equal(theirs, ours)
    assert torch.equal(theirs, emulated)


def test_asymmetric_weights_decompress_exactly_with_the_package(tmp_path):
    # transformers 5.23 cannot load asymmetric pack-quantized folders (it sizes the packed
    # zero point as unpacked; llm-compressor's own checkpoints fail the same way), so the
    # format is checked with the package's decompressor, the code vLLM's format follows
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = tiny_model("qwen2", dtype=torch.bfloat16)
    qmodel = qfx.quantize(model, "w4 g32 asym scale-model")
    qfx.export(qmodel, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**config["config_groups"]["group_0"])
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    path = "model.layers.1.mlp.down_proj"
    local = {k.removeprefix(path + "."): v for k, v in tensors.items() if k.startswith(path + ".")}
    assert set(local) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    mod = qmodel.get_submodule(path)
    ours = dequantize_packed(mod.qweight, mod.w_scale, mod.w_zero, 4, 32, 96)
    torch.testing.assert_close(dense.float(), ours.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    gpt2 = qfx.quantize(tiny_model("gpt2"), "w4 g16")
    with pytest.raises(ExportError, match="Conv1D"):
        qfx.export(gpt2, tmp_path / "a", format="compressed-tensors")
    asym88 = qfx.quantize(tiny_model("llama"), "w8 g0 asym a8")
    with pytest.raises(ExportError, match="must be symmetric"):
        qfx.export(asym88, tmp_path / "b", format="compressed-tensors")
    clipped = qfx.quantize(tiny_model("llama"), "w8 g0 a8 a-clip0.9")
    with pytest.raises(ExportError, match="no activation clip ratio"):
        qfx.export(clipped, tmp_path / "d", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(qfx.CheckpointError, match="unknown export format"):
        qfx.export(asym88, tmp_path / "c", format="onnx")
