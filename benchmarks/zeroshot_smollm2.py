"""Zero-shot accuracy of SmolLM2-135M, full precision and quantized, on every task, full sets.

    python benchmarks/zeroshot_smollm2.py [--device cuda] [--limit N] [--lambada-file PATH]
        [--recipes "rtn w4 g64 asym;gptq w4 g64 asym"] [--out benchmarks/results]

Rewrites its one results file, zeroshot_smollm2.md (and .json): per recipe and task, the
metrics lm-evaluation-harness reports, with standard errors, the documents scored and the
seconds each model took. GPTQ calibrates on wiki-summaries (128 x 2048 tokens, seed 0),
never on the evaluation data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import transformers

import qfx
from qfx.data import calibration_samples, read_text, tokenize
from qfx.models import load_hf
from qfx.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lambada-file", default=str(ROOT.parent / "shared" / "data" / "lambada_openai.jsonl"))
    ap.add_argument("--recipes", default="rtn w4 g64 asym;gptq w4 g64 asym")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    model, tok = load_hf("smollm2-135m", torch.bfloat16, a.device, progress=False)
    calib = calibration_samples(tokenize(read_text("wiki-summaries"), tok), 128, 2048, 0).split(8)
    rows = []
    for name in ["full precision", *a.recipes.split(";")]:
        t = time.time()
        m = model if name == "full precision" else qfx.quantize(model, name, calib=calib, device=a.device,
                                                                 progress=False)
        quantize_s = time.time() - t
        t = time.time()
        res = qfx.evaluate(m, tok, TASKS, limit=a.limit, batch_size=a.batch_size, max_length=2048, device=a.device,
                           lambada_file=a.lambada_file, progress=False)
        rows.append({"model": name, "results": res, "eval_seconds": round(time.time() - t, 1),
                     "quantize_seconds": round(quantize_s, 1)})
        print(name, json.dumps(res), flush=True)
    meta = {"date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "command": "python " + " ".join(sys.argv), "limit": a.limit}
    write(Path(a.out), meta, rows)


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "zeroshot_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = ["# Zero-shot tasks, SmolLM2-135M (the embedded Instruct Q4_1 GGUF, bf16)", "",
             f"{meta['date']}, {meta['device']}, {versions}.", "", f"    {meta['command']}", "",
             f"- Documents: {'all' if meta['limit'] is None else 'the first ' + str(meta['limit'])} of each task "
             "(PIQA, BoolQ, WinoGrande, HellaSwag validation; ARC test; LAMBADA OpenAI test); prompts and metrics "
             "as lm-evaluation-harness; +- is the standard error.",
             "- GPTQ calibration: wiki-summaries, 128 x 2048 tokens, seed 0.", ""]
    cols = [(t, m) for t in ("piqa", "boolq", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada")
            for m in {"lambada": ("acc", "perplexity")}.get(t, ("acc", "acc_norm") if t in
                                                             ("piqa", "hellaswag", "arc_easy", "arc_challenge")
                                                             else ("acc",))]
    lines.append("| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " | eval s |")
    lines.append("|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = []
        for t, m in cols:
            v = r["results"][t]
            cells.append(f"{v[m]:.2f}" if m == "perplexity" else f"{100 * v[m]:.1f} ± {100 * v[m + '_stderr']:.1f}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['eval_seconds']:.0f} |")
    (out / "zeroshot_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
