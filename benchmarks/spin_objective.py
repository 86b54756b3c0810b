"""SpinQuant's training objective before and after learning: does the Cayley descent lower it?

    python benchmarks/spin_objective.py --model /path/smollm2.gguf --eval wikitext2_test.txt \
        --steps 0,25,100 --lrs 1.5 --out benchmarks/results

For each (steps, step size) the rotations are learned as `qfx.learn_rotations` learns them
(calibration: 128 x 2048 tokens of wiki-summaries, seed 0, one sample per step, in order), then
the objective, the next-token loss (nats) with every planned linear's input fake-quantized per
token and full-precision weights, is measured on the first 16 calibration samples (seen while
learning), on the last 16 (unseen for up to 112 steps), and on 8 windows of the evaluation text;
plus the full-precision loss on those windows (rotation-invariant: a check on the folding).
Writes spin_objective.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qfx.learn_rotations import _FakeQuantRun, learn_rotations  # noqa: E402
from qfx.capture import capture  # noqa: E402
from qfx.graph import get_attr_tensor  # noqa: E402
from qfx.config import Recipe  # noqa: E402
from qfx.data import calibration_samples, eval_windows, read_text, tokenize  # noqa: E402
from qfx.models import load_hf  # noqa: E402
from qfx.passes.annotate_linears import annotate_linears  # noqa: E402
from qfx.passes.canonicalize_linears import canonicalize_linears  # noqa: E402
from qfx.passes.fold_norms import checked_stream  # noqa: E402
from qfx.passes.quantize_kv import quantize_kv_cache  # noqa: E402
from qfx.passes.rotate import plan_rotation, rotate, rotated_tensors  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval", required=True, help="evaluation text file")
    ap.add_argument("--recipe", default="spinquant,gptq w4 g-1 a4")
    ap.add_argument("--steps", default="0,25,100")
    ap.add_argument("--lrs", default="1.5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    recipe = Recipe.parse(a.recipe)
    model, tok = load_hf(a.model, device=a.device)
    calib = calibration_samples(tokenize(read_text("wiki-summaries"), tok), 128, 2048, 0)
    held = eval_windows(tokenize(read_text(a.eval), tok), 2048, 8)

    # the graph learn_rotations learns on: norms folded, R3 / R4 online, identity R1 / R2
    gm = canonicalize_linears(capture(model))
    plan = plan_rotation(gm, checked_stream(gm))
    ident = {"R1": torch.eye(plan.width, dtype=torch.float64)}
    ident.update({k: torch.eye(r.fold.head_dim, dtype=torch.float64) for k, r in zip(plan.r2_keys(), plan.heads)})
    gm = annotate_linears(quantize_kv_cache(rotate(gm, rotations=ident), recipe.kv), recipe)
    plan = plan_rotation(gm, checked_stream(gm))
    base = {t: get_attr_tensor(gm, t).detach().float() for t in plan.targets()}
    dtypes = {t: get_attr_tensor(gm, t).dtype for t in plan.targets()}

    @torch.no_grad()
    def loss(rot: dict, batches: torch.Tensor, quantized: bool = True) -> float:
        r1 = rot["R1"].to(a.device).float()
        r2 = {k: v.to(a.device).float() for k, v in rot.items() if k != "R1"}
        params = {t: v.to(dtypes[t]) for t, v in rotated_tensors(base, plan, r1, r2).items()}
        run = _FakeQuantRun(gm, params, False)
        if not quantized:
            run.planned = {}
        total = 0.0
        for ids in batches:
            out = run.run(ids[None].to(a.device))
            logits = out[0] if isinstance(out, (tuple, list)) else out
            total += torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:].to(a.device)).item()
        return total / len(batches)

    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        for lr in [float(v) for v in a.lrs.split(",")]:
            t0 = time.time()
            rot = learn_rotations(model, recipe, list(calib.split(1)), steps, lr, progress=False)
            row = {"steps": steps, "lr": lr, "learn_s": round(time.time() - t0, 1),
                   "calib_seen_16": loss(rot, calib[:16]), "calib_last_16": loss(rot, calib[-16:]),
                   "eval_8": loss(rot, held), "eval_8_full_precision": loss(rot, held, quantized=False)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/spin_objective.py " + " ".join(sys.argv[1:]), "recipe": a.recipe,
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "spin_objective.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
