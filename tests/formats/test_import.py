"""Importing compressed-tensors and GPTQ folders into qfx ops, and running them compiled."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qfx
from qfx.formats.gptq import pack_along_rows, unpack_along_rows
from tests.conftest import tiny_model

CASES = [
    ("compressed-tensors", "w4 g32 asym scale-model"),
    ("compressed-tensors", "w4 g16 sym a8 scale-model"),
    ("compressed-tensors", "w8 g0 a8 scale-model"),
    ("compressed-tensors", "w8 g0 a8 a-static scale-model"),
    ("compressed-tensors", "fp8 scale-model"),
    ("gptq", "w4 g16 sym scale-model"),
    ("gptq", "w8 g0 asym scale-model"),
]


def _calib():
    return [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("fmt, recipe", CASES)
def test_export_then_import_is_bit_identical(fmt, recipe, tmp_path, token_ids):
    model = tiny_model("qwen2", dtype=torch.bfloat16, tie_word_embeddings=True)
    qmodel = qfx.quantize(model, recipe, calib=_calib(), progress=False)
    qfx.export(qmodel, tmp_path / "m", format=fmt)
    imported = qfx.load(tmp_path / "m")
    assert qfx.passes.counts(imported)["quantize_linears"] == 14
    with torch.no_grad():
        assert torch.equal(imported(token_ids), qmodel(token_ids))


def test_imported_checkpoint_runs_through_the_backend(tmp_path, token_ids):
    model = tiny_model("llama", dtype=torch.float32)
    qfx.export(qfx.quantize(model, "w4 g32 sym scale-model"), tmp_path / "m", format="gptq")
    imported = qfx.load(tmp_path / "m")
    compiled = torch.compile(imported, backend="qfx")
    with torch.no_grad():
        torch.testing.assert_close(compiled(token_ids), imported(token_ids), rtol=1e-3, atol=1e-3)


def test_row_packing_round_trip():
    codes = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert torch.equal(unpack_along_rows(pack_along_rows(codes, 4), 4), codes)


def test_foreign_checkpoints_with_problems_are_refused(tmp_path):
    qmodel = qfx.quantize(tiny_model("llama"), "w4 g16 sym scale-model")
    good = qfx.export(qmodel, tmp_path / "g", format="gptq")
    tensors = load_file(str(good / "model.safetensors"))
    config = json.loads((good / "config.json").read_text())

    def variant(name, tensors=tensors, config=config):
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    unknown = dict(config, quantization_config={"quant_method": "awq-magic"})
    with pytest.raises(qfx.CheckpointError, match="unknown checkpoint format"):
        qfx.load(variant("unknown", config=unknown))

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.scales"}
    with pytest.raises(qfx.CheckpointError, match="up_proj.scales' is missing"):
        qfx.load(variant("missing", tensors=missing))

    wrong = dict(tensors)
    wrong["model.layers.0.mlp.down_proj.scales"] = torch.ones(3, 64, dtype=torch.float16)
    with pytest.raises(qfx.CheckpointError, match="down_proj.w_scale has shape"):
        qfx.load(variant("wrong", tensors=wrong))

    act_order = dict(tensors)
    act_order["model.layers.0.self_attn.q_proj.g_idx"] = torch.randperm(64).to(torch.int32) // 16
    with pytest.raises(qfx.CheckpointError, match="act-order"):
        qfx.load(variant("actorder", tensors=act_order))


def _write_with_compressed_tensors(path):
    """A checkpoint made by the compressed-tensors library itself (its qparams, its packing)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama", dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=16)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            groups = module.weight.detach().reshape(module.weight.shape[0], -1, 16)
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale)
    ModelCompressor.from_pretrained_model(model).compress_model(model)
    model.save_pretrained(path)
    ModelCompressor.from_pretrained_model(model).update_config(path)


def test_checkpoint_from_another_tool_matches_transformers_and_compiles(tmp_path, token_ids):
    from transformers import AutoModelForCausalLM

    _write_with_compressed_tensors(tmp_path / "foreign")
    imported = qfx.load(tmp_path / "foreign")
    assert qfx.passes.counts(imported)["quantize_linears"] == 14
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "foreign").eval()
    with torch.no_grad():
        expected = reference(input_ids=token_ids).logits
        assert torch.equal(imported(token_ids), expected)
        compiled = torch.compile(imported, backend="qfx")
        torch.testing.assert_close(compiled(token_ids).float(), expected.float(), rtol=0.02, atol=0.02)
