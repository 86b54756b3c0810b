"""SmolLM2-135M through the serving formats: qfx's perplexity against transformers' on the
exported compressed-tensors folder, and checkpoint sizes against the bf16 baseline.

    python benchmarks/interop_smollm2.py [--eval-windows 8] [--seq-len 512]

Writes benchmarks/results/interop_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import qfx
from qfx.data import eval_windows, read_text, tokenize
from qfx.eval import perplexity
from qfx.models import load_hf

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"
RECIPES = ["rtn w4 g64 sym scale-model", "rtn w8 g0 a8 scale-model"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_hf("smollm2-135m", torch.bfloat16, "cpu")
    windows = eval_windows(tokenize(read_text(str(WIKITEXT)), tokenizer), a.seq_len, a.eval_windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, str(tmp / "bf16.safetensors"))
        bf16_bytes = (tmp / "bf16.safetensors").stat().st_size
        for recipe in RECIPES:
            t0 = time.time()
            qmodel = qfx.quantize(model, recipe)
            name = recipe.replace(" ", "_")
            qfx.save(qmodel, tmp / f"{name}-qfx", tokenizer=tokenizer)
            qfx.export(qmodel, tmp / f"{name}-ct", format="compressed-tensors", tokenizer=tokenizer)
            ppl_qfx = perplexity(qmodel, windows, progress=False)
            hf = AutoModelForCausalLM.from_pretrained(tmp / f"{name}-ct").eval()
            ppl_hf = perplexity(lambda ids: hf(input_ids=ids).logits, windows, progress=False)
            rows.append({
                "recipe": recipe,
                "ppl_qfx": ppl_qfx,
                "ppl_transformers_compressed_tensors": ppl_hf,
                "relative_difference": abs(ppl_hf - ppl_qfx) / ppl_qfx,
                "qfx_checkpoint_bytes": folder_bytes(tmp / f"{name}-qfx"),
                "compressed_tensors_bytes": folder_bytes(tmp / f"{name}-ct"),
                "bf16_bytes": bf16_bytes,
                "seconds": round(time.time() - t0, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    import compressed_tensors
    import transformers

    header = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/interop_smollm2.py " + " ".join(sys.argv[1:]),
        "device": "cpu", "machine": platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "protocol": f"WikiText-2 test, first {a.eval_windows} windows of {a.seq_len} tokens; model in bfloat16",
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interop_smollm2.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    lines = ["# SmolLM2-135M in the compressed-tensors format", ""] + [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| recipe | ppl qfx | ppl transformers | rel. diff | qfx ckpt / bf16 | c-t ckpt / bf16 |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['ppl_qfx']:.4f} | {r['ppl_transformers_compressed_tensors']:.4f} | "
                     f"{r['relative_difference']:.2e} | {r['qfx_checkpoint_bytes'] / r['bf16_bytes']:.3f} | "
                     f"{r['compressed_tensors_bytes'] / r['bf16_bytes']:.3f} |")
    (out / "interop_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
