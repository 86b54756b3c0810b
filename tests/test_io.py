import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qfx
from qfx.io import CheckpointError, export, load, load_exported, save
from tests.conftest import tiny_model


@pytest.fixture
def qmodel():
    model = tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    return qfx.quantize(model, "w4 g32 asym a8 rule:down_proj=w8.g0")


def test_save_load_is_bit_identical(qmodel, tmp_path, token_ids):
    save(qmodel, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(token_ids), qmodel(token_ids))
    meta = json.loads((tmp_path / "ck" / "qfx.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # tied: stored once
    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.qweight"].dtype == torch.uint8
    assert not any(k.endswith("up_proj.weight") for k in tensors)


def test_static_activation_scales_survive_a_round_trip(tmp_path, token_ids):
    model = tiny_model("qwen2")
    calib = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = qfx.quantize(model, "w8 g0 a8 a-static", calib=calib, progress=False)
    save(q, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ck")(token_ids), q(token_ids))


def test_activation_clip_ratio_reaches_the_op_and_survives_a_round_trip(tmp_path, token_ids):
    model = tiny_model("llama")
    q = qfx.quantize(model, "w4 g0 a4 a-clip0.8")
    ops = [n for n in q.graph.nodes if n.target is torch.ops.qfx.quantized_linear.default]
    assert ops and all(n.args[10] == 0.8 for n in ops)
    with torch.no_grad():
        assert not torch.equal(q(token_ids), qfx.quantize(model, "w4 g0 a4")(token_ids))
    save(q, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ck")(token_ids), q(token_ids))


def test_existing_output_is_not_overwritten_unless_asked(qmodel, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="exists"):
        save(qmodel, out)
    assert (out / "keep.txt").read_text() == "user data"
    save(qmodel, out, overwrite=True)
    assert (out / "qfx.json").is_file() and not (out / "keep.txt").exists()


def test_failed_save_leaves_nothing(qmodel, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(qmodel, tmp_path / "ck", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_refused_naming_the_problem(qmodel, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no qfx.json"):
        load(tmp_path / "empty")
    ck = save(qmodel, tmp_path / "ck")
    tensors = load_file(str(ck / "model.safetensors"))

    (ck / "qfx.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(ck)
    save(qmodel, ck, overwrite=True)

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.w_scale"]
    save_file(missing, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj.w_scale' is missing"):
        load(ck)

    wrong = dict(tensors)
    wrong["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(3, 3, dtype=torch.uint8)
    save_file(wrong, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj.qweight.*expects"):
        load(ck)

    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load(ck)


def test_save_needs_an_hf_source():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    q = qfx.quantize(m, "w4 g0", example_inputs=(torch.randn(2, 8),))
    with pytest.raises(CheckpointError, match="qfx.export"):
        save(q, "/nonexistent/never-written")


def test_export_round_trip_with_dynamic_shapes(qmodel, tmp_path, token_ids):
    path = export(qmodel, tmp_path / "m.pt2")
    assert path.is_file() and list(tmp_path.iterdir()) == [path]
    reloaded = load_exported(path)
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids), qmodel(token_ids))
        assert torch.equal(reloaded(token_ids[:1, :4]), qmodel(token_ids[:1, :4]))


def test_exported_program_runs_in_a_fresh_process(qmodel, tmp_path, token_ids):
    export(qmodel, tmp_path / "m.pt2")
    torch.save(token_ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(qmodel(token_ids), tmp_path / "expected.pt")
    code = (
        "import sys, torch, qfx\n"
        f"m = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"ok = torch.equal(m(ids), torch.load({str(tmp_path / 'expected.pt')!r}))\n"
        "sys.exit(0 if ok else 3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


class _Payload:  # any class a pickle could name; loading it would run code
    pass


def _rewrite_archive(src, dst, replace):
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            for suffix, new in replace.items():
                if item.filename.endswith(suffix):
                    data = new(data)
            zout.writestr(item, data)


def test_exported_archives_that_need_unpickling_are_refused(qmodel, tmp_path):
    import io

    good = export(qmodel, tmp_path / "m.pt2")

    def flag_pickle(data):
        config = json.loads(data)
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True
        return json.dumps(config).encode()

    _rewrite_archive(good, tmp_path / "a.pt2", {"_weights_config.json": flag_pickle})
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_exported(tmp_path / "a.pt2")

    def pickled_object(_data):
        buf = io.BytesIO()
        torch.save(((_Payload(),), {}), buf)
        return buf.getvalue()

    _rewrite_archive(good, tmp_path / "b.pt2", {"sample_inputs/model.pt": pickled_object})
    with pytest.raises(CheckpointError, match="needs unpickling"):
        load_exported(tmp_path / "b.pt2")
    (tmp_path / "c.pt2").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a .pt2"):
        load_exported(tmp_path / "c.pt2")


def test_saved_files_follow_the_umask(qmodel, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = save(qmodel, tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
