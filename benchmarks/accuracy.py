"""Perplexity of SmolLM2-135M on WikiText-2 for each (method, setting) cell, qfx and llm-compressor.

    python benchmarks/accuracy.py --grid cpu --device cpu --eval-windows 8 --calib-samples 16
    python benchmarks/accuracy.py --grid full --device cuda            # 128 x 2048 calibration
    python benchmarks/accuracy.py --grid rotation --device cuda        # QuaRot / SpinQuant cells
    ... --peer-python /path/to/venv/bin/python   # also run llm-compressor in that environment

Each qfx cell is one `qfx quantize ... --json` process (so its peak memory is its own); each
llm-compressor cell one `benchmarks/peer_llmcompressor.py` process on the same calibration
samples and evaluation windows. Rows go to accuracy_smollm2[_<tag>].json (rotation_smollm2 for
--grid rotation, accuracy_smollm2_cpu for --grid cpu) (a list of rows:
tool, method, setting, ppl, ppl_fp, eval_windows, calib_samples, calib_seconds, peak_mem_mb,
device) and a Markdown table beside it, rewritten after every cell.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import shlex
import sys
import tempfile
from pathlib import Path

from results_notes import write_keeping_notes

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"
SETTINGS = {
    "W4A16 g64 asym": ["--w-bits", "4", "--w-group", "64", "--w-asym"],
    "W4A16 g64 sym": ["--w-bits", "4", "--w-group", "64", "--w-sym"],
    "W3A16 g64 asym": ["--w-bits", "3", "--w-group", "64", "--w-asym"],
    "W4A8 g64 sym": ["--w-bits", "4", "--w-group", "64", "--w-sym", "--a-bits", "8"],
    "W8A8": ["--w-bits", "8", "--w-group", "0", "--a-bits", "8"],
    "W4A4 KV16": ["--w-bits", "4", "--w-group", "-1", "--w-sym", "--a-bits", "4"],
    "W4A4 a-clip0.9 KV16": ["--w-bits", "4", "--w-group", "-1", "--w-sym", "--a-bits", "4", "--a-clip", "0.9"],
    "W16A16 KV4": ["--w-bits", "16", "--kv-bits", "4"],
    "W16A16 KV4 g32": ["--w-bits", "16", "--kv-bits", "4", "--kv-group", "32"],
}
WEIGHT_ONLY = ["rtn", "gptq", "gptaq", "awq", "awq+"]
GRIDS = {
    "full": [(m, s) for s in ("W4A16 g64 asym", "W4A16 g64 sym", "W3A16 g64 asym") for m in WEIGHT_ONLY]
    + [(m, "W4A8 g64 sym") for m in ("rtn", "gptq", "gptaq", "smoothquant,gptq")]
    + [(m, "W8A8") for m in ("rtn", "smoothquant", "smoothquant,gptq")],
    "cpu": [(m, s) for s in ("W4A16 g64 asym", "W3A16 g64 asym") for m in WEIGHT_ONLY]
    + [(m, "W4A8 g64 sym") for m in ("rtn", "gptq", "smoothquant,gptq")]
    + [(m, "W8A8") for m in ("rtn", "smoothquant")],
    # rotations (QuaRot, SpinQuant): low-bit activations and KV cache
    "rotation": [(m, "W4A4 KV16") for m in ("rtn", "gptq", "quarot", "quarot,gptq", "spinquant", "spinquant,gptq")]
    + [(m, "W4A4 a-clip0.9 KV16") for m in ("rtn", "quarot,gptq", "spinquant,gptq")]
    + [(m, "W4A8 g64 sym") for m in ("rtn", "gptq", "gptaq", "quarot,gptq", "spinquant,gptq")]
    + [(m, s) for s in ("W16A16 KV4", "W16A16 KV4 g32") for m in ("rtn", "quarot")],
}
# each grid's result files under --out (a --tag is appended)
STEMS = {"full": "accuracy_smollm2", "cpu": "accuracy_smollm2_cpu", "rotation": "rotation_smollm2"}
# the llm-compressor recipe standing for each qfx method (see peer_llmcompressor.py)
PEER_METHODS = {"rtn": "rtn", "gptq": "gptq", "awq": "awq", "smoothquant": "smoothquant",
                "smoothquant,gptq": "smoothquant,gptq", "quarot": "quarot", "quarot,gptq": "quarot,gptq"}
# settings it runs (no activation clip ratio or KV-cache cells there)
PEER_SETTINGS = ("W4A16 g64 asym", "W4A16 g64 sym", "W3A16 g64 asym", "W4A8 g64 sym", "W8A8", "W4A4 KV16")


def _run(cmd: list[str]) -> str:
    """stdout of cmd; on failure, an error that carries the end of its stderr (the cause)."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.replace("\r", "\n").strip().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {done.returncode}:\n{tail}")
    return done.stdout


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def run_qfx(method: str, setting: str, a, fp: bool) -> dict:
    cmd = [sys.executable, "-m", "qfx.cli", "quantize", "--method", method, *SETTINGS[setting], *common_args(a),
           "--search-samples", str(a.search_samples), "--spin-steps", str(a.spin_steps),
           "--spin-lr", str(a.spin_lr), "--spin-batch", str(a.spin_batch),
           "--rotation-seed", str(a.rotation_seed),
           "--calib-batch-size", str(a.calib_batch_size), "--json", "--quiet"]
    if not fp:
        cmd.append("--no-fp-eval")
    r = _last_json(_run(cmd))
    peak = r["peak_gpu_mb"] if a.device.startswith("cuda") else r["peak_rss_mb"]
    return {"tool": "qfx", "method": method, "setting": setting, "ppl": r["ppl_quant"], "ppl_fp": r["ppl_fp"],
            "eval_windows": r["eval_windows"], "calib_samples": r["calib_samples"],
            "calib_seconds": r["calib_seconds"], "peak_mem_mb": peak, "device": a.device}


def run_peer(method: str, setting: str, a) -> dict:
    cmd = [a.peer_python, str(ROOT / "benchmarks" / "peer_llmcompressor.py"), "--method", PEER_METHODS[method],
           "--setting", setting, *common_args(a)]
    r = _last_json(_run(cmd))
    return {"tool": "llm-compressor", "method": method, "setting": setting, **r, "device": a.device}


def common_args(a) -> list[str]:
    args = ["--model", a.model, "--eval", a.eval, "--seq-len", str(a.seq_len), "--device", a.device,
            "--calib", "wiki-summaries", "--calib-samples", str(a.calib_samples)]
    return args + (["--eval-windows", str(a.eval_windows)] if a.eval_windows else [])


def write(rows: list[dict], a, header: dict) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = STEMS[a.grid] + (f"_{a.tag}" if a.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{stem}_meta.json").write_text(json.dumps(header, indent=1))
    ppl_fp = next((r["ppl_fp"] for r in rows if r.get("ppl_fp")), None)
    rtn = {r["setting"]: r["ppl"] for r in rows if r["tool"] == "qfx" and r["method"] == "rtn"}
    lines = [f"# Accuracy grid, SmolLM2-135M ({a.device})", ""] + [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", f"Full precision: ppl {ppl_fp:.3f}" if ppl_fp else "", "",
              "| setting | method | tool | ppl | share of RTN's gap closed | calib s | peak MB |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = ""
        if ppl_fp and r["setting"] in rtn and r["method"] != "rtn" and rtn[r["setting"]] > ppl_fp:
            gap = f"{(rtn[r['setting']] - r['ppl']) / (rtn[r['setting']] - ppl_fp):.0%}"
        method = r["method"] + (f" ({r['run']})" if r.get("run") else "")
        lines.append(f"| {r['setting']} | {method} | {r['tool']} | {r['ppl']:.3f} | {gap} | "
                     f"{r['calib_seconds']:.0f} | {r['peak_mem_mb']:.0f} |")
    write_keeping_notes(out / f"{stem}.md", "\n".join(lines))


def merge(a) -> None:
    """One table from several runs of this script with the same protocol (their commands listed).
    Runs are given oldest first: a later run's cell (tool, method, setting) replaces every row
    an earlier run had for it."""
    out = Path(a.out)
    rows, commands, header = [], [], {}
    for stem in a.merge:
        later = json.loads((out / f"{stem}.json").read_text())
        cells = {(r["tool"], r["method"], r["setting"]) for r in later}
        rows = [r for r in rows if (r["tool"], r["method"], r["setting"]) not in cells] + later
        meta = json.loads((out / f"{stem}_meta.json").read_text())
        commands.append(meta["command"])
        header = {**meta, **header}
    ppl_fp = next(r["ppl_fp"] for r in rows if r.get("ppl_fp"))
    for r in rows:
        r["ppl_fp"] = ppl_fp  # every run evaluates the same windows; the first one measured FP
    header["command"] = " ; ".join(commands)
    order = {m: i for i, m in enumerate(dict.fromkeys(m for grid in GRIDS.values() for m, _ in grid))}
    rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), order.get(r["method"], 99), r["tool"] != "qfx"))
    write(rows, a, header)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", choices=sorted(GRIDS), default="full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-windows", type=int, default=None, help="default: all 147 windows")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-batch-size", type=int, default=8, help="qfx: calibration samples per pass through a block")
    p.add_argument("--search-samples", type=int, default=16, help="qfx AWQ: samples its scale search runs on")
    p.add_argument("--spin-steps", type=int, default=100, help="qfx SpinQuant: Cayley SGD steps")
    p.add_argument("--spin-lr", type=float, default=1.5, help="qfx SpinQuant: Cayley SGD step size")
    p.add_argument("--rotation-seed", type=int, default=0,
                   help="qfx QuaRot/SpinQuant: seed of the random Hadamard rotations (SpinQuant starts from them)")
    p.add_argument("--spin-batch", type=int, default=1, help="qfx SpinQuant: samples per Cayley step")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded) or its .gguf file")
    p.add_argument("--eval", default=str(WIKITEXT), help="the WikiText-2 test text")
    p.add_argument("--peer-python", default=None, help="python of an environment with llmcompressor installed")
    p.add_argument("--peer-only", action="store_true", help="run only the llm-compressor cells")
    p.add_argument("--settings", default=None, help="comma-separated settings to run (default: the grid's)")
    p.add_argument("--only", nargs="+", default=None, help="methods (pipelines such as quarot,gptq) to run "
                   "(default: the whole grid)")
    p.add_argument("--tag", default=None, help="suffix of the result files, e.g. cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--merge", nargs="+", default=None, metavar="STEM",
                   help="combine earlier runs' result files (e.g. accuracy_smollm2_cpu), oldest first, into one "
                   "table; a later run's cell replaces an earlier one's")
    a = p.parse_args()
    if a.merge:
        return merge(a)
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        if a.model.endswith(".gguf") or a.model == "smollm2-135m":
            a.model = convert_once(a.model, Path(folder))
        run_grid(a, header(a, torch, transformers))


def convert_once(model: str, folder: Path) -> str:
    """A GGUF is dequantized on every load: write it once as a HF folder all cells load (the
    same bf16 weights and tokenizer)."""
    from qfx.models import load_hf

    m, tok = load_hf(model)
    m.hf_quantizer = None  # the weights are already dequantized to bf16: save them as they are
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def header(a, torch, transformers) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:]),
        "device": a.device,
        "machine": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "protocol": f"WikiText-2 test ({WIKITEXT.name}, rows joined by newlines), non-overlapping windows of "
        f"{a.seq_len} tokens from the start ({a.eval_windows or 'all'} windows); model in bfloat16; head in "
        f"bfloat16; calibration: {a.calib_samples} x {a.seq_len} tokens drawn with seed 0 from wiki-summaries "
        "(Wikipedia lead sections, not the evaluation text); block-by-block calibration, qfx running "
        f"{a.calib_batch_size} samples per pass through a block; qfx AWQ searches on "
        f"{a.search_samples} samples; qfx SpinQuant takes {a.spin_steps} Cayley steps, "
        f"{'one sample' if a.spin_batch == 1 else f'{a.spin_batch} samples'} each, constant step size "
        f"{a.spin_lr}; random Hadamard rotations drawn with seed {a.rotation_seed}; "
        "W4A4 is int4 per-channel symmetric weights and int4 per-token activations (a-clip0.9: each token's "
        "range clipped to 0.9 of its max |x|); peak_mem_mb is the process's peak RSS on CPU, peak allocated GPU memory "
        "during calibration on CUDA",
    }


def run_grid(a, header: dict) -> None:
    only = set(a.only) if a.only else None
    rows: list[dict] = []
    for i, (method, setting) in enumerate(GRIDS[a.grid]):
        if (only and method not in only) or (a.settings and setting not in a.settings.split(",")):
            continue
        if not a.peer_only:
            row = run_qfx(method, setting, a, fp=not rows)
            rows.append(row)
            print(f"{setting:16s} {method:18s} qfx ppl {row['ppl']:.3f} calib {row['calib_seconds']:.0f}s", flush=True)
            write(rows, a, header)
        if a.peer_python and method in PEER_METHODS and setting in PEER_SETTINGS:
            peer = run_peer(method, setting, a)
            peer["ppl_fp"] = rows[0]["ppl_fp"] if rows else None
            rows.append(peer)
            print(f"{setting:16s} {method:18s} llm-compressor ppl {peer['ppl']:.3f}", flush=True)
            write(rows, a, header)


if __name__ == "__main__":
    main()
