"""Quantizing from disk block by block gives what quantizing in memory gives, bit for bit, while
holding one block's weights at a time."""

import errno
import json
import weakref

import pytest
import torch
import transformers as T

import qfx
import qfx.weight_files
from qfx.cli import main
from qfx.config import ConfigError
from qfx.stream import FolderStream, quantize_streaming
from qfx.weight_files import WeightFiles
from tests.conftest import tiny_model

CALIB = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _sharded(tmp_path, arch="llama", **overrides):
    """A float32 model saved as several safetensors shards (quantized in bfloat16: cast as read)."""
    folder = tmp_path / f"src-{arch}"
    tiny_model(arch, **overrides).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize("arch, tied, recipe", [
    *[("llama", True, r) for r in ("rtn w4 g32 asym", "gptq w4 g32", "gptaq w4 g32", "awq w4 g32", "awq+ w4 g32",
                                   "smoothquant w8 g0 a8", "gptq w8 g0 a8 a-static")],
    ("qwen2", False, "gptq w4 g32"), ("qwen2", False, "awq w4 g32")])  # biases, an untied head
def test_streaming_stores_the_in_memory_tensors_bit_for_bit(tmp_path, recipe, arch, tied, token_ids):
    src = _sharded(tmp_path, arch, tie_word_embeddings=tied)
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    in_memory = qfx.save(qfx.quantize(model, recipe, calib=CALIB, progress=False), tmp_path / "mem")
    streamed = quantize_streaming(src, recipe, tmp_path / "str", calib=CALIB, progress=False)
    a, b = WeightFiles(in_memory), WeightFiles(streamed)
    assert sorted(a.names()) == sorted(b.names())
    different = [n for n in a.names() if not torch.equal(a.tensor(n), b.tensor(n))]
    assert not different, different[:3]
    meta_a, meta_b = (json.loads((p / "qfx.json").read_text()) for p in (in_memory, streamed))
    assert meta_a["aliases"] == meta_b["aliases"] and meta_a["counts"] == meta_b["counts"]
    with torch.no_grad():
        assert torch.equal(qfx.load(in_memory)(token_ids), qfx.load(streamed)(token_ids))


def test_one_block_of_weights_is_in_memory_at_a_time(tmp_path, monkeypatch):
    src = _sharded(tmp_path, "llama", num_hidden_layers=4)
    alive: list[weakref.ref] = []
    peak = 0
    load = FolderStream.load

    def counting_load(self, target, like):
        nonlocal peak
        t = load(self, target, like)
        alive.append(weakref.ref(t))
        peak = max(peak, sum(r().numel() * r().element_size() for r in alive if r() is not None))
        return t

    monkeypatch.setattr(FolderStream, "load", counting_load)
    quantize_streaming(src, "gptq w4 g32", tmp_path / "out", calib=CALIB, progress=False)
    model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=4)
    block = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < peak <= block < total / 4, (peak, block, total)


def test_rotations_are_refused_for_they_change_every_weight_first(tmp_path):
    with pytest.raises(ConfigError, match="quarot folds rotations into every weight"):
        quantize_streaming(_sharded(tmp_path), "quarot,gptq w4", tmp_path / "out", calib=CALIB)


def test_a_full_disk_leaves_no_output_and_no_temporary_folder(tmp_path, monkeypatch):
    src = _sharded(tmp_path)
    monkeypatch.setattr(qfx.weight_files, "SHARD_BYTES", 10_000)  # several shards, so the failure is mid-run
    writes = 0
    save_file = qfx.weight_files.save_file

    def full_after_one(*args, **kwargs):
        nonlocal writes
        writes += 1
        if writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(qfx.weight_files, "save_file", full_after_one)
    out = tmp_path / "out" / "q"
    with pytest.raises(OSError, match="No space left"):
        quantize_streaming(src, "rtn w4 g32", out, progress=False)
    assert writes == 2 and not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_cli_streams_a_folder_and_the_result_loads(tmp_path, tiny_hf_dir, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_hf_dir), "--stream", "--method", "gptq", "--w-group", "32",
                 "--seq-len", "32", "--calib-samples", "2", "--output", str(out), "--quiet", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["streamed"] and result["calib_samples"] == 2 and result["checkpoint_bytes"] > 0
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "tokenizer.json").is_file()
    qfx.load(out)


@pytest.mark.parametrize("argv, message", [
    (["--model", "smollm2-135m", "--output", "{tmp}/q"], "is loaded whole: drop --stream"),
    (["--model", "{src}"], "give --output FOLDER"),
    (["--model", "{src}", "--method", "quarot,gptq", "--output", "{tmp}/q"], "needs the whole model in memory"),
])
def test_cli_stream_bad_input_is_one_line(tmp_path, tiny_hf_dir, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, src=tiny_hf_dir) for a in argv]
    assert main(["quantize", "--stream", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "q").exists()


def test_cli_says_a_full_disk_in_one_line(tmp_path, tiny_hf_dir, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qfx.weight_files, "save_file", full)
    assert main(["quantize", "--model", str(tiny_hf_dir), "--stream", "--output", str(tmp_path / "q"),
                 "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk full" in err and "removed" in err, err
    assert not (tmp_path / "q").exists()


def test_cli_streams_by_itself_when_the_weights_would_not_fit(tmp_path, tiny_hf_dir, capsys, monkeypatch):
    import qfx.cli

    monkeypatch.setattr(qfx.cli, "_memory_available", lambda: 1000)  # bytes: less than any model
    assert main(["quantize", "--model", str(tiny_hf_dir), "--output", str(tmp_path / "q"), "--quiet", "--json",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["streamed"]
    assert "memory is available: quantizing block by block from disk" in captured.err
