"""RTN and GPTQ perplexity of SmolLM2-135M on WikiText-2 through the qfx CLI, one row per setting.

    python benchmarks/rtn_smollm2.py [--eval-windows N] [--device cpu|cuda] [--out benchmarks/results]

Each setting is one `qfx quantize ... --json` run (the first also measures the full-precision
model on the same windows); the rows go to rtn_smollm2_<device>.json and a Markdown table
beside it, with the protocol, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"
SETTINGS = [
    ("W4A16 g64 asym", ["--w-bits", "4", "--w-group", "64", "--w-asym"]),
    ("W4A16 g64 sym", ["--w-bits", "4", "--w-group", "64", "--w-sym"]),
    ("W3A16 g64 asym", ["--w-bits", "3", "--w-group", "64", "--w-asym"]),
    ("W8A8 per-channel / per-token", ["--w-bits", "8", "--w-group", "0", "--a-bits", "8"]),
    ("GPTQ W4A16 g64 asym", ["--method", "gptq", "--w-bits", "4", "--w-group", "64", "--w-asym"]),
    ("GPTQ W3A16 g64 asym", ["--method", "gptq", "--w-bits", "3", "--w-group", "64", "--w-asym"]),
]


def run(setting_args, common, fp: bool) -> dict:
    cmd = [sys.executable, "-m", "qfx.cli", "quantize", *setting_args, *common, "--json", "--quiet"]
    if not fp:
        cmd.append("--no-fp-eval")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eval-windows", type=int, default=None, help="default: all windows of the text")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration samples of --seq-len tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    common = ["--model", "smollm2-135m", "--eval", str(WIKITEXT), "--seq-len", str(a.seq_len), "--device", a.device,
              "--calib", "wiki-summaries", "--calib-samples", str(a.calib_samples)]
    if a.eval_windows:
        common += ["--eval-windows", str(a.eval_windows)]
    rows, ppl_fp = [], None
    for i, (name, args) in enumerate(SETTINGS):
        r = run(args, common, fp=i == 0)
        ppl_fp = r["ppl_fp"] if i == 0 else ppl_fp
        r.update(setting=name, ppl_fp=ppl_fp)
        rows.append(r)
        print(f"{name:32s} ppl {r['ppl_quant']:.3f} (fp {ppl_fp:.3f})", flush=True)
    import torch
    import transformers

    header = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/rtn_smollm2.py " + " ".join(sys.argv[1:]),
        "device": a.device,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "protocol": f"WikiText-2 test ({WIKITEXT.name}, rows joined by newlines), non-overlapping windows of "
        f"{a.seq_len} tokens from the start, {rows[0]['eval_windows']} windows = {rows[0]['eval_tokens']} tokens; "
        "model in bfloat16; embeddings and lm_head in bfloat16; RTN uses no calibration; GPTQ "
        f"(act-order, damp 0.01, not yet block-sequential) calibrates on {a.calib_samples} x {a.seq_len} tokens of "
        "wiki-summaries (Wikipedia lead sections, not the evaluation text)",
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rtn_smollm2_{a.device}.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    lines = [f"# RTN and GPTQ on SmolLM2-135M ({a.device})", ""] + [f"- {k}: {v}" for k, v in header.items()] + [
        "", "| setting | ppl | ppl / fp | quantize s |", "|---|---|---|---|",
        f"| FP (bf16) | {ppl_fp:.3f} | 1.000 | |",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['ppl_quant']:.3f} | {r['ppl_quant'] / ppl_fp:.3f} | "
                     f"{r['quantize_seconds']:.1f} |")
    (out / f"rtn_smollm2_{a.device}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
