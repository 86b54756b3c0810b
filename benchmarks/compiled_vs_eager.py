"""Perplexity of SmolLM2-135M quantized by qfx: eager reference ops against the same model
compiled with `backend="qfx"` (Triton kernels on CUDA), on the same WikiText-2 windows.

    python benchmarks/compiled_vs_eager.py --device cuda --model <SmolLM2 .gguf> --eval <wikitext2_test.txt>

Calibration-free recipes (the kernels do not depend on how the codes were chosen). Writes
compiled_vs_eager.{md,json}: per recipe the eager and compiled perplexity, their relative
difference, how many linears the backend lowered to kernels and fused, and how many online
rotations (QuaRot's R3, R4) it took into a GEMM or ran on their own kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qfx  # noqa: E402
from qfx.data import eval_windows, read_text, tokenize  # noqa: E402
from qfx.eval import perplexity  # noqa: E402
from qfx.lowering.backend import qfx_backend  # noqa: E402
from qfx.models import load_hf  # noqa: E402

RECIPES = ["w4 g128 asym", "w4 g64 sym", "w8 g0", "w8 g0 a8", "w4 g128 sym a8", "fp8", "quarot w8 g0 a8", "quarot fp8"]


def compiled_perplexity(q, windows, device) -> tuple[float, dict]:
    seen: dict = {}

    def backend(gm, example_inputs):
        compiled = qfx_backend(gm, example_inputs)
        seen.update(gm.meta["qfx"])
        return compiled

    torch._dynamo.reset()
    return perplexity(torch.compile(q, backend=backend, dynamic=False), windows, 1, device, False), seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded) or its .gguf file")
    ap.add_argument("--eval", default=str(ROOT.parent / "shared" / "data" / "wikitext2_test.txt"))
    ap.add_argument("--eval-windows", type=int, default=None, help="default: all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--recipes", default=";".join(RECIPES), help="semicolon-separated recipes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    model, tokenizer = load_hf(a.model, torch.bfloat16, a.device)
    windows = eval_windows(tokenize(read_text(a.eval), tokenizer), 2048, a.eval_windows)
    meta = {"date": datetime.date.today().isoformat(), "command": "python " + shlex.join(sys.argv),
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
            "torch": torch.__version__, "eval_windows": int(windows.shape[0])}
    rows = []
    for recipe in a.recipes.split(";"):
        q = qfx.quantize(model, recipe, progress=False)
        eager = perplexity(q, windows, 1, a.device, False)
        compiled, info = compiled_perplexity(q, windows, a.device)
        rows.append({"recipe": recipe, "eager_ppl": eager, "compiled_ppl": compiled, "rel_diff": compiled / eager - 1,
                     "lowered": info.get("lowered", 0), "fused": info.get("fused", 0),
                     "rotations_fused": info.get("rotations_fused", 0),
                     "rotations_lowered": info.get("rotations_lowered", 0),
                     "unsupported": info.get("unsupported", [])[:3]})
        print(json.dumps(rows[-1]), flush=True)
        del q
        write(Path(a.out), meta, rows)
    return 0


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled_vs_eager.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# SmolLM2-135M: eager qfx ops against torch.compile(backend=\"qfx\")", "",
             f"{meta['date']}, {meta['device']}, torch {meta['torch']}; WikiText-2 test, {meta['eval_windows']} "
             "windows of 2048 tokens; model in bf16.", f"Command: `{meta['command']}`", "",
             "| recipe | eager ppl | compiled ppl | difference | linears on kernels | of them fused | "
             "rotations in a GEMM / alone |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['eager_ppl']:.4f} | {r['compiled_ppl']:.4f} | {r['rel_diff']:+.4%} | "
              f"{r['lowered']} | {r['fused']} | {r.get('rotations_fused', 0)} / {r.get('rotations_lowered', 0)} |"
              for r in rows]
    (out / "compiled_vs_eager.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
