"""The qfx command line on a tiny local HF folder (SmolLM2's tokenizer, random 2-layer Llama)."""

import json

import pytest


from qfx.cli import main, recipe_string, build_parser
from tests.conftest import WIKITEXT


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_json_line_has_the_contract_keys(capsys, tmp_path, tiny_hf_dir):
    out_dir = tmp_path / "q"
    code, out, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--w-bits", 4, "--w-group", 32, "--w-asym",
                          "--eval", WIKITEXT, "--eval-windows", 2, "--seq-len", 64, "--output", out_dir,
                          "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("model", "method", "recipe", "ppl_fp", "ppl_quant", "eval_tokens", "seq_len", "seconds",
                "peak_rss_mb", "checkpoint_bytes"):
        assert key in result
    assert result["recipe"] == "rtn w4 g32 asym a16"
    assert result["eval_tokens"] == 128 and result["eval_windows"] == 2
    assert result["ppl_fp"] > 1 and result["ppl_quant"] > 1
    assert result["checkpoint_bytes"] == (out_dir / "model.safetensors").stat().st_size

    code, out, err = _run(capsys, "eval", "--model", out_dir, "--eval", WIKITEXT, "--eval-windows", 2,
                          "--seq-len", 64, "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    reloaded = json.loads(out.strip().splitlines()[-1])
    assert reloaded["ppl"] == pytest.approx(result["ppl_quant"], rel=1e-9)
    assert reloaded["method"] == "rtn"


def test_static_activations_calibrate_from_a_local_file(capsys, tmp_path, tiny_hf_dir):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"sample number {i} about quantization"}) for i in range(200)))
    code, out, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--w-bits", 8, "--w-group", 0, "--a-bits", 8,
                          "--a-static", "--calib", calib, "--calib-samples", 4, "--seq-len", 32,
                          "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["calib_samples"] == 4 and result["calib_source"] == str(calib)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "magic"], "unknown method 'magic'"),
        (["--w-bits", "9"], "2..8 bits"),
        (["--rule", "down_proj"], "REGEX=SPEC"),
    ],
)
def test_bad_quantize_arguments_exit_nonzero_with_one_line(capsys, tmp_path, tiny_hf_dir, args, message):
    out_dir = tmp_path / "never"
    code, out, err = _run(capsys, "quantize", "--model", tiny_hf_dir, *args, "--output", out_dir, "--quiet")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_eval_text_shorter_than_a_window_leaves_no_output(capsys, tmp_path, tiny_hf_dir):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out_dir = tmp_path / "never"
    code, _, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--eval", short, "--seq-len", 512,
                        "--output", out_dir, "--quiet")
    assert code == 2 and "shorter than one window" in err
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    code, _, err = _run(capsys, "eval", "--model", tmp_path / "nope", "--eval", WIKITEXT, "--quiet")
    assert code == 2 and "no such folder or file" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qfx.json").write_text("{")
    code, _, err = _run(capsys, "eval", "--model", bad, "--eval", WIKITEXT, "--quiet")
    assert code == 2 and "corrupt" in err


def test_existing_output_is_refused_before_any_work(capsys, tmp_path, tiny_hf_dir):
    (tmp_path / "out").mkdir()
    code, _, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--output", tmp_path / "out", "--quiet")
    assert code == 2 and "--overwrite" in err


def test_recipe_string_from_flags():
    a = build_parser().parse_args(["quantize", "--w-bits", "3", "--w-group", "-1", "--w-asym", "--a-bits", "8",
                                   "--rule", "down_proj=w8", "--method", "rtn"])
    assert recipe_string(a) == "rtn w3 g-1 asym a8 rule:down_proj=w8"
    a = build_parser().parse_args(["quantize", "--method", "spinquant,gptq", "--a-bits", "4", "--no-act-order",
                                   "--spin-lr", "0.5", "--sq-alpha", "search", "--rotation-seed", "2"])
    assert recipe_string(a).endswith("a4 no-act-order sq-alpha-search rot-seed2 spin-lr0.5")



def test_export_command_writes_each_format(capsys, tmp_path, tiny_hf_dir):
    saved = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--w-bits", 4, "--w-group", 32,
                        "--w-scale-dtype", "model", "--output", saved, "--device", "cpu", "--quiet")
    assert code == 0, err
    for fmt, name in (("compressed-tensors", "ct"), ("gptq", "gptq"), ("pt2", "m.pt2")):
        code, out, err = _run(capsys, "export", saved, "--format", fmt, "--output", tmp_path / name, "--json")
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["bytes"] > 0
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    code, _, err = _run(capsys, "export", saved, "--format", "gptq", "--output", tmp_path / "gptq")
    assert code == 2 and "exists" in err


def test_quantize_report_flag(capsys, tmp_path, tiny_hf_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text about many things " * 200)
    code, out, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--report", tmp_path / "rep", "--calib", calib,
                          "--calib-samples", 2, "--seq-len", 32, "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    assert (tmp_path / "rep" / "report.md").is_file()


def test_gptq_method_from_the_command_line(capsys, tmp_path, tiny_hf_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("calibration text for the second order statistics of every layer " * 300)
    code, out, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--method", "gptq", "--w-bits", 4,
                          "--w-group", 32, "--calib", calib, "--calib-samples", 4, "--seq-len", 64,
                          "--eval", WIKITEXT, "--eval-windows", 2, "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["method"] == "gptq" and result["calib_samples"] == 4 and result["quantized_linears"] == 14


@pytest.mark.parametrize("method", ["gptaq", "awq", "awq+", "smoothquant,gptq"])
def test_each_block_wise_method_from_the_command_line(capsys, tmp_path, tiny_hf_dir, method):
    calib = tmp_path / "calib.txt"
    calib.write_text("calibration text for the scales and second order statistics of every layer " * 300)
    code, out, err = _run(capsys, "quantize", "--model", tiny_hf_dir, "--method", method, "--w-bits", 4,
                          "--w-group", 32, "--a-bits", 8 if method.startswith("smooth") else 16,
                          "--calib", calib, "--calib-samples", 2, "--search-samples", 1, "--seq-len", 64,
                          "--eval", WIKITEXT, "--eval-windows", 1, "--device", "cpu", "--offload",
                          "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["method"] == method and result["quantized_linears"] == 14
    assert result["ppl_quant"] < 2 * result["ppl_fp"]


def test_quarot_and_spinquant_from_the_command_line(capsys, tmp_path, tiny_hf_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("calibration text for rotations and second order statistics " * 300)
    common = ["--model", tiny_hf_dir, "--w-bits", 4, "--w-group", -1, "--a-bits", 4, "--kv-bits", 8, "--calib", calib,
              "--calib-samples", 2, "--seq-len", 64, "--eval", WIKITEXT, "--eval-windows", 1, "--device", "cpu",
              "--json", "--quiet"]
    code, out, err = _run(capsys, "quantize", "--method", "quarot,gptq", *common)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["recipe"].startswith("quarot,gptq w4 g-1 sym a4 kv8") and result["quantized_linears"] == 14

    rotations = tmp_path / "rot.safetensors"
    code, out, err = _run(capsys, "quantize", "--method", "spinquant", "--spin-steps", 2, "--rotation-out",
                          rotations, "--output", tmp_path / "spin", *common)
    assert code == 0, err
    learned = json.loads(out.strip().splitlines()[-1])
    assert rotations.is_file() and learned["calib_samples"] == 2
    # the saved rotations reproduce the learned model without learning again
    code, out, err = _run(capsys, "quantize", "--method", "spinquant", "--rotation-path", rotations, *common)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["ppl_quant"] == pytest.approx(learned["ppl_quant"], rel=1e-9)
    code, out, err = _run(capsys, "export", tmp_path / "spin", "--format", "compressed-tensors", "--output",
                          tmp_path / "ct")
    assert code != 0 and "qfx.hadamard" in err and not (tmp_path / "ct").exists()
