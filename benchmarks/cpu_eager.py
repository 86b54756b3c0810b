"""Eager perplexity time of quantized SmolLM2-135M on the CPU against the original model.

    python benchmarks/cpu_eager.py [--dtype bfloat16] [--windows 4] [--seq-len 512] [--repeats 3]

The quantized graphs run qfx's reference ops (no compile): weights dequantized once and
cached, symmetric per-channel int weights with int activations as an int32 GEMM. Each model
evaluates the same WikiText-2 windows; the best of `--repeats` runs is kept (after one
warm-up window). Rewrites benchmarks/results/cpu_eager.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qfx  # noqa: E402
from qfx.data import eval_windows, read_text, tokenize  # noqa: E402
from qfx.eval import perplexity  # noqa: E402
from qfx.models import load_hf  # noqa: E402

RECIPES = ["rtn w4 g64 asym", "rtn w8 g0 a8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    model, tok = load_hf("smollm2-135m", getattr(torch, a.dtype), progress=False)
    windows = eval_windows(tokenize(read_text(str(ROOT.parent / "shared" / "data" / "wikitext2_test.txt")), tok),
                           a.seq_len, a.windows)
    models = {"original (transformers)": lambda ids: model(input_ids=ids).logits}
    models.update({r: qfx.quantize(model, r, progress=False) for r in RECIPES})
    best, ppl = {k: float("inf") for k in models}, {}
    for m in models.values():
        perplexity(m, windows[:1], progress=False)
    for _ in range(a.repeats):  # interleaved, so that a busy moment hits every model alike
        for k, m in models.items():
            t = time.perf_counter()
            ppl[k] = perplexity(m, windows, progress=False)
            best[k] = min(best[k], time.perf_counter() - t)
    base = best["original (transformers)"]
    lines = ["# Eager CPU evaluation time, SmolLM2-135M", "",
             f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}; {a.dtype}; WikiText-2, {a.windows} windows of {a.seq_len} tokens; best of "
             f"{a.repeats}.", "", f"    python {' '.join(sys.argv)}", "",
             "| model | seconds | x original | perplexity |", "|---|---|---|---|"]
    lines += [f"| {k} | {best[k]:.2f} | {best[k] / base:.2f} | {ppl[k]:.3f} |" for k in models]
    Path(a.out, "cpu_eager.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
