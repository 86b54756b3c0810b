"""Zero-shot accuracy and WikiText-2 perplexity of SmolLM2-135M, full precision and quantized
by each method at W8A8, W4A16 g64 and W4A8 g64 (and W4A4 for the rotations), full sets.

    python benchmarks/zeroshot_smollm2.py [--device cuda] [--cells "rtn@W8A8;gptq@W4A16 g64"]
        [--compiled "rtn@W4A16 g64"] [--merge] [--limit N] [--out benchmarks/results]
        [--shard I/N --no-fp]                     # one of N workers sharing a GPU
    python benchmarks/zeroshot_smollm2.py --join W0/zeroshot_smollm2.json W1/... [--merge]

Rewrites its one results file, zeroshot_smollm2.md (and .json): per cell the perplexity, each
task's metrics as lm-evaluation-harness reports them (with standard errors), the average of
the headline accuracies, and the seconds quantizing and evaluating took. --merge keeps the
rows of cells this run does not evaluate (the grid does not fit one 10-minute run); every row
records the run it came from. A 135M model leaves the GPU mostly idle between launches, so
N workers (--shard I/N, every N-th cell from the I-th) each writing their own --out, joined
afterwards with --join, cover the grid in about 1/N of the time. --compiled also evaluates those cells compiled with
backend="qfx" (Triton kernels on CUDA) and records how far each metric moved from eager.
Calibration: wiki-summaries (128 x 2048 tokens, seed 0), never the evaluation data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qfx  # noqa: E402
from results_notes import write_keeping_notes  # noqa: E402
from qfx.data import calibration_samples, eval_windows, read_text, tokenize  # noqa: E402
from qfx.eval import perplexity  # noqa: E402
from qfx.models import load_hf  # noqa: E402
from qfx.tasks import TASKS  # noqa: E402

SETTINGS = {"W8A8": "w8 g0 a8", "W4A16 g64": "w4 g64 sym", "W4A8 g64": "w4 g64 sym a8", "W4A4": "w4 g-1 sym a4"}
METHODS = ["rtn", "smoothquant", "gptq", "gptaq", "awq", "awq+", "quarot,gptq", "spinquant,gptq"]
GRID = [f"{m}@{s}" for s in ("W8A8", "W4A16 g64", "W4A8 g64") for m in METHODS] + \
       [f"{m}@W4A4" for m in ("quarot,gptq", "spinquant,gptq")]
# the accuracy each task is usually quoted by; the average is over these
HEADLINE = {"piqa": "acc", "boolq": "acc", "winogrande": "acc", "hellaswag": "acc_norm", "arc_easy": "acc",
            "arc_challenge": "acc_norm", "lambada": "acc"}


def recipe(cell: str) -> str:
    method, setting = cell.split("@")
    return f"{method} {SETTINGS[setting]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded) or its .gguf file")
    ap.add_argument("--cells", default=";".join(GRID), help="semicolon-separated method@setting")
    ap.add_argument("--compiled", default="", help="cells to evaluate compiled too")
    ap.add_argument("--merge", action="store_true", help="keep the rows of other cells from the results file")
    ap.add_argument("--shard", default="0/1", help="I/N: evaluate every N-th cell starting at the I-th")
    ap.add_argument("--fp", action=argparse.BooleanOptionalAction, default=True,
                    help="evaluate full precision (--no-fp: another worker does)")
    ap.add_argument("--join", nargs="+", metavar="JSON", help="combine workers' results files into --out and exit")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lambada-file", default=str(ROOT.parent / "shared" / "data" / "lambada_openai.jsonl"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared" / "data" / "wikitext2_test.txt"))
    ap.add_argument("--eval-windows", type=int, default=None, help="default: all")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    path = Path(a.out) / "zeroshot_smollm2.json"
    old = json.loads(path.read_text()) if a.merge and path.exists() else {"runs": [], "rows": []}
    if a.join:
        write(path, join([old] + [json.loads(Path(f).read_text()) for f in a.join]))
        return
    shard, shards = (int(x) for x in a.shard.split("/"))
    cells = [c for c in a.cells.split(";") if c][shard::shards]
    compiled = [c for c in a.compiled.split(";") if c]
    model, tok = load_hf(a.model, torch.bfloat16, a.device, progress=False)
    calib = calibration_samples(tokenize(read_text("wiki-summaries"), tok), 128, 2048, 0).split(8)
    windows = eval_windows(tokenize(read_text(a.eval), tok), 2048, a.eval_windows)
    run = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "command": "python " + shlex.join(sys.argv), "limit": a.limit, "eval_windows": int(windows.shape[0])}
    runs = old["runs"] + [run]
    rows = {(r["cell"], r["mode"]): r for r in old["rows"]}

    def evaluate(m, cell: str, quantize_s: float, mode: str) -> dict:
        t = time.time()
        ppl = perplexity(m, windows, 8, a.device, progress=False)
        res = qfx.evaluate(m, tok, TASKS, limit=a.limit, batch_size=a.batch_size, max_length=2048,
                           device=a.device, lambada_file=a.lambada_file, progress=False)
        row = {"cell": cell, "mode": mode, "ppl": ppl, "results": res, "run": len(runs) - 1,
               "eval_seconds": round(time.time() - t, 1), "quantize_seconds": round(quantize_s, 1)}
        print(json.dumps(row), flush=True)
        return row

    if a.fp and ("full precision", "eager") not in rows:
        rows["full precision", "eager"] = evaluate(lambda ids: model(ids).logits, "full precision", 0.0, "eager")
        write(path, {"runs": runs, "rows": list(rows.values())})
    for cell in cells:
        t = time.time()
        q = qfx.quantize(model, recipe(cell), calib=calib, device=a.device, progress=False)
        quantize_s = time.time() - t
        rows[cell, "eager"] = evaluate(q, cell, quantize_s, "eager")
        if cell in compiled:
            torch._dynamo.reset()
            rows[cell, "compiled"] = evaluate(torch.compile(q, backend="qfx", dynamic=True), cell, quantize_s,
                                                "compiled")
        del q
        write(path, {"runs": runs, "rows": list(rows.values())})


def join(parts: list[dict]) -> dict:
    """One results dict from several: runs concatenated, each row's run index moved with its file's
    runs; a later file's row replaces an earlier one of the same cell and mode."""
    runs, rows = [], {}
    for part in parts:
        for r in part["rows"]:
            rows[(r["cell"], r["mode"])] = {**r, "run": r["run"] + len(runs)}
        runs += part["runs"]
    return {"runs": runs, "rows": list(rows.values())}


def write(path: Path, data: dict) -> None:
    """The .json and its table; a '## Notes' section already in the .md is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")  # a reader never sees half a file
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    order = ["full precision", *GRID]
    rows = sorted(data["rows"], key=lambda r: (order.index(r["cell"]) if r["cell"] in order else len(order),
                                               r["mode"]))
    lines = ["# Zero-shot tasks and WikiText-2 perplexity, SmolLM2-135M", "",
             "Full precision is SmolLM2-135M-Instruct as shipped in a Q4_1 GGUF, dequantized to bf16 (hence lower "
             "than published base-model numbers); every other row quantizes that model.", ""]
    for i, run in enumerate(data["runs"]):
        versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
        lines.append(f"- Run {i}: {run['date']}, {run['device']}, {versions}: `{run['command']}`")
    lines.append("")
    limits = {run["limit"] for run in data["runs"]}
    lines += [f"- Documents: {'all' if limits == {None} else 'the first ' + str(limits)} of each task (PIQA, BoolQ, "
              "WinoGrande, HellaSwag validation; ARC test; LAMBADA OpenAI test); prompts and metrics as "
              "lm-evaluation-harness. Columns: acc, except acc_norm for HellaSwag and ARC-Challenge; avg is their "
              "mean; ppl: WikiText-2 test, 2048-token windows, "
              f"{' / '.join(str(n) for n in sorted({run['eval_windows'] for run in data['runs']}))} windows from the start.",
              "- Calibration: wiki-summaries, 128 x 2048 tokens, seed 0. W8A8: int8 per-channel weights, int8 "
              "per-token activations; W4A16 / W4A8 g64: int4 symmetric groups of 64 (with int8 per-token "
              "activations); W4A4: int4 per-channel weights and int4 per-token activations.",
              "- Rows marked compiled ran through torch.compile(backend=\"qfx\") instead of qfx's eager reference ops.",
              ""]
    lines.append("| cell | mode | ppl | " + " | ".join(f"{t} {m}" for t, m in HEADLINE.items()) +
                 " | avg | quantize s | eval s | run |")
    lines.append("|---|---|---|" + "---|" * (len(HEADLINE) + 4))
    for r in rows:
        accs = [100 * r["results"][t][m] for t, m in HEADLINE.items()]
        lines.append(f"| {r['cell']} | {r['mode']} | {r['ppl']:.3f} | " + " | ".join(f"{v:.1f}" for v in accs) +
                     f" | {sum(accs) / len(accs):.2f} | {r['quantize_seconds']:.0f} | {r['eval_seconds']:.0f} | "
                     f"{r['run']} |")
    fp = next((r for r in rows if r["cell"] == "full precision"), None)
    if fp:
        spread = max(abs(r["results"][t][m + "_stderr"] - fp["results"][t][m + "_stderr"])
                     for r in rows for t, m in HEADLINE.items())
        lines += ["", f"Standard errors of the full-precision row (points; every other row's are within "
                  f"{100 * spread:.1f} of these): " + ", ".join(f"{t} {100 * fp['results'][t][m + '_stderr']:.1f}"
                                        for t, m in HEADLINE.items()) + "."]
    write_keeping_notes(path.with_suffix(".md"), "\n".join(lines))


if __name__ == "__main__":
    main()
