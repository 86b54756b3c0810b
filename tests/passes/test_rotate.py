"""Norm folding and QuaRot rotations are exact rewrites of random-weight models of five
families; bad rotations and non-rotatable models are refused."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import qfx
from qfx.capture import capture
from qfx.formats import ExportError
from qfx.io import CheckpointError
from qfx.passes.canonicalize_linears import canonicalize_linears
from qfx.passes.fold_norms import RotationError, fold_norms
from qfx.passes.rotate import rotate
from tests.conftest import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "opt", "gpt2"]
LAYER_NORM = ("opt", "gpt2")
HADAMARD = torch.ops.qfx.hadamard.default


def _model(family, tie=False, **kw):
    model = tiny_model(family, dtype=torch.float64, tie_word_embeddings=tie, **kw)
    with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma), biases at 0: make them generic
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _captured(model):
    return canonicalize_linears(capture(model))  # GPT-2's Conv1D matmuls become linears, as prepare does


def _logits(gm, ids):
    out = gm(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_norm_folding_is_exact_in_float64(family, tie, token_ids):
    model = _model(family, tie)
    ref = model(token_ids).logits
    gm = fold_norms(_captured(model))
    # Gemma's norm multiplies by (1 + w) in float32 whatever the model dtype; the others in its dtype
    assert _rel(_logits(gm, token_ids), ref) < (1e-6 if family == "gemma" else 1e-10)
    assert gm.meta["qfx"]["counts"]["fold_norms"] == 2 * 2 + 1  # two per block and the final norm
    if family in LAYER_NORM:  # LayerNorms became RMSNorms: no layer_norm left, no norm parameter read
        assert not any(n.target is torch.ops.aten.layer_norm.default for n in gm.graph.nodes)
        assert not any(n.op == "get_attr" and "layer_norm" in n.target for n in gm.graph.nodes)
        return
    norms = [t for n, t in gm.named_parameters() if "norm" in n]
    offset = 1.0 if family == "gemma" else 0.0  # Gemma's norms are (1 + w)
    assert all(torch.equal(t + offset, torch.ones_like(t)) for t in norms)
    torch.testing.assert_close(model(token_ids).logits, ref, rtol=0, atol=0)  # the model keeps its weights


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_rotations_are_exact_in_float64(family, tie, token_ids):
    model = _model(family, tie)
    ref = model(token_ids).logits
    gm = rotate(_captured(model), seed=1)
    # HF's RMSNorm computes in float32 whatever the model dtype, so float64 agreement stops near 1e-7;
    # OPT's and GPT-2's LayerNorms (now RMSNorms on a centred stream) compute in float64
    assert _rel(_logits(gm, token_ids), ref) < (1e-10 if family in LAYER_NORM else 1e-6)
    online = [n for n in gm.graph.nodes if n.target is HADAMARD]
    assert len(online) == 2 * 3  # per block: before down_proj, on queries and on keys
    assert torch.equal(model(token_ids).logits, ref)
    if tie:  # the embedding and the head now hold different tensors
        tables = [n.args[0].target for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
        assert "lm_head.weight" not in tables


def test_rotated_weights_are_really_rotated(token_ids):
    model = _model("llama")
    gm = rotate(capture(model), seed=0)
    e0, e1 = model.model.embed_tokens.weight, gm.get_submodule("model.embed_tokens").weight
    assert _rel(e1, e0) > 0.1
    torch.testing.assert_close(e1.norm(dim=1), e0.norm(dim=1))  # rows rotated, lengths kept


def test_given_rotations_are_used_and_checked(tmp_path, token_ids):
    model = _model("llama")
    ref = model(token_ids).logits
    heads = [f"R2.model.layers.{i}.self_attn.o_proj" for i in range(2)]
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    rotations = {"R1": q, **{k: torch.eye(16, dtype=torch.float64) for k in heads}}
    gm = rotate(capture(model), rotations=rotations)
    assert _rel(_logits(gm, token_ids), ref) < 1e-6
    torch.testing.assert_close(gm.get_submodule("model.embed_tokens").weight, model.model.embed_tokens.weight @ q)

    with pytest.raises(RotationError, match=r"R1 is \(32, 32\); this model needs \(64, 64\)"):
        rotate(capture(model), rotations={"R1": torch.eye(32)})
    with pytest.raises(RotationError, match="not orthogonal"):
        rotate(capture(model), rotations={"R1": torch.ones(64, 64)})
    with pytest.raises(RotationError, match="parts this model does not have"):
        rotate(capture(model), rotations={"R2.model.layers.7.self_attn.o_proj": torch.eye(16)})

    path = tmp_path / "rot.safetensors"
    save_file({k: v.contiguous() for k, v in rotations.items()}, str(path))
    r = replace(qfx.Recipe.parse("quarot w8 g-1"), rotation_path=str(path))
    prepared = qfx.prepare(model, r)
    torch.testing.assert_close(prepared.get_submodule("model.embed_tokens").weight,
                               model.model.embed_tokens.weight @ q)
    with pytest.raises(RotationError, match="does not exist"):
        qfx.prepare(model, replace(r, rotation_path=str(tmp_path / "missing.safetensors")))


def test_a_stream_written_in_ways_not_understood_is_refused_naming_the_node():
    # captured without canonicalize_linears, GPT-2's Conv1D is an addmm, not a linear
    with pytest.raises(RotationError, match=r"add_\d+ adds addmm_\d+ .* to the residual stream"):
        rotate(capture(tiny_model("gpt2")))


def test_quarot_w4a4_saves_reloads_exactly_and_refuses_serving_export(tmp_path, token_ids):
    model = tiny_model("llama", tie_word_embeddings=True)
    qmodel = qfx.quantize(model, "quarot w4 g-1 a4 kv4", progress=False)
    counts = qmodel.meta["qfx"]["counts"]
    assert counts["rotate"] > 0 and counts["quantize_kv_cache"] == 4 and counts["quantize_linears"] == 14
    out = _logits(qmodel, token_ids)
    qfx.save(qmodel, tmp_path / "q")
    assert torch.equal(_logits(qfx.load(tmp_path / "q"), token_ids), out)
    with pytest.raises(ExportError, match="qfx.hadamard"):
        qfx.export(qmodel, tmp_path / "ct", format="compressed-tensors")


def test_rotated_model_compiles_with_the_qfx_backend_and_exports(tmp_path, token_ids):
    qmodel = qfx.quantize(tiny_model("llama"), "quarot w4 g32 asym kv8", progress=False)
    with torch.no_grad():
        eager = _logits(qmodel, token_ids)
        compiled = _logits(torch.compile(qmodel, backend="qfx"), token_ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)  # Inductor reorders float32 sums
    path = qfx.export(qmodel, tmp_path / "m.pt2")
    with torch.no_grad():
        assert torch.equal(_logits(qfx.load_exported(path), token_ids), eager)


def test_format_1_checkpoints_load_unless_their_online_rotations_changed(tmp_path, token_ids):
    # format 1 rotated size 172 online with a random orthogonal factor; it is now a
    # Goethals-Seidel Hadamard matrix, so such a checkpoint would not reload as saved
    def saved_as_v1(model, name):
        qmodel = qfx.quantize(model, "quarot w4 g-1", progress=False)
        qfx.save(qmodel, tmp_path / name)
        meta_file = tmp_path / name / "qfx.json"
        assert json.loads(meta_file.read_text())["format_version"] == 2
        assert torch.equal(_logits(qfx.load(tmp_path / name), token_ids), _logits(qmodel, token_ids))
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "format_version": 1}))
        return qmodel

    unchanged = saved_as_v1(tiny_model("llama"), "same")
    assert torch.equal(_logits(qfx.load(tmp_path / "same"), token_ids), _logits(unchanged, token_ids))
    saved_as_v1(tiny_model("llama", intermediate_size=172), "changed")
    with pytest.raises(CheckpointError, match="format 1.* size 172 online"):
        qfx.load(tmp_path / "changed")
