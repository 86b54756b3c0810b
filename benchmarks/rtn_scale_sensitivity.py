"""How much SmolLM2-135M's RTN perplexity moves when every weight scale is nudged slightly.

    python benchmarks/rtn_scale_sensitivity.py --recipe "w4 g64 sym" --factors 1,1.002,0.998 --eval-windows 8

Each factor multiplies every scale that qfx's range-to-qparams step returns, before the codes
are chosen; "bf16" rounds the scales to bfloat16 instead (as compressed-tensors stores them); "model"
runs the recipe with `scale-model` (qfx's own choice of bf16 scales); "randR:SEED" moves
each scale by its own random factor in [1 - R, 1 + R] (the size of bf16 rounding at R = 0.002);
"absmax" (symmetric only) picks compressed-tensors' s = max|w| / (2^(b-1) - 1/2), which puts
the value of largest magnitude on a rounding tie, instead of qfx's
s = max(-min / 2^(b-1), max / (2^(b-1) - 1)), which puts it exactly on a code.
Two quantizers of the same quality can differ this much in perplexity, which bounds what a
small gap between tools means. Writes rtn_scale_sensitivity_<device>.{md,json}.
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
from qfx import primitives as P  # noqa: E402
from qfx.data import eval_windows, read_text, tokenize  # noqa: E402
from qfx.eval import perplexity  # noqa: E402
from qfx.models import load_hf  # noqa: E402


def nudged(choose, factor: str):
    """`choose_qparams` with its scales multiplied by `factor` (or rounded to bf16, or each
    multiplied by its own uniform random factor in [1 - r, 1 + r] for `randR:SEED`)."""
    generator = torch.Generator().manual_seed(int(factor.split(":")[1])) if factor.startswith("rand") else None

    def choose_nudged(x_min, x_max, bits, symmetric, scale_dtype=None):
        scale, zero = choose(x_min, x_max, bits, symmetric, scale_dtype)
        if factor == "model":  # the recipe's own scale-model path decides
            return scale, zero
        if generator is not None:
            r = float(factor[4:].split(":")[0])
            scale = scale * (1 + (torch.rand(scale.shape, generator=generator) * 2 - 1) * r)
        elif factor == "absmax":
            if symmetric:
                amax = torch.maximum(-x_min.float().clamp(max=0), x_max.float().clamp(min=0))
                scale = torch.clamp(amax / ((1 << (bits - 1)) - 0.5), min=1e-12)
        elif factor == "bf16":
            scale = scale.to(torch.bfloat16).float()
        else:
            scale = scale * float(factor)
        return scale, zero

    return choose_nudged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="w4 g64 sym", help="a calibration-free recipe")
    ap.add_argument("--factors", default="1,1.002,0.998,bf16,absmax",
                    help="comma list of scale factors, bf16 or absmax (see above)")
    ap.add_argument("--eval", default=str(ROOT.parent / "shared" / "data" / "wikitext2_test.txt"))
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    model, tokenizer = load_hf("smollm2-135m", torch.bfloat16, a.device)
    windows = eval_windows(tokenize(read_text(a.eval), tokenizer), a.seq_len, a.eval_windows)
    choose = P.choose_qparams
    rows = []
    try:
        for factor in a.factors.split(","):
            P.choose_qparams = nudged(choose, factor)
            q = qfx.quantize(model, a.recipe + (" scale-model" if factor == "model" else ""), progress=False)
            rows.append({"factor": factor, "ppl": perplexity(q, windows, 1, a.device, False)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        P.choose_qparams = choose
    meta = {"date": datetime.date.today().isoformat(), "command": "python " + shlex.join(sys.argv),
            "recipe": a.recipe, "eval_windows": int(windows.shape[0]), "device": a.device}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"rtn_scale_sensitivity_{a.device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# RTN scale sensitivity, SmolLM2-135M, `{a.recipe}`", "",
             f"{meta['date']}, {a.device}, torch {torch.__version__}; WikiText-2 test, {meta['eval_windows']} windows "
             f"of {a.seq_len} tokens; model in bf16.", f"Command: `{meta['command']}`", "",
             "| scales | ppl |", "|---|---|"]
    names = {"bf16": "rounded to nearest bf16", "absmax": "max|w| / 7.5 at 4 bits (largest magnitude on a tie)",
             "model": "scale-model: the bf16 value next to each scale that reconstructs its group best"}

    def name(f: str) -> str:
        if f.startswith("rand"):
            r, seed = f[4:].split(":")
            return f"each x its own uniform factor in [1 - {r}, 1 + {r}] (seed {seed})"
        return names.get(f, "x " + f)

    lines += [f"| {name(r['factor'])} | {r['ppl']:.3f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
