"""Calibration speed and memory of block-by-block GPTQ on random-weight models of real shapes.

    python benchmarks/calib_speed.py --device cuda --shapes smollm2-135m,llama3-8b --out benchmarks/results

The model is built in CPU memory (random weights: speed depends on shapes, not values), and
`qfx.quantize(..., device=...)` calibrates one block at a time on the device, so peak GPU
memory is one block's weights, Hessians and the activations between blocks. Calibration
tokens are random ids (128 x 2048 by default), run through each block 8 samples at a time
(--batch-size). Writes calib_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # LlamaConfig fields
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def random_model(shape: str, init_device: str = "cpu"):
    """The model in CPU memory, bf16; matrices N(0, 0.02) drawn on `init_device` (drawing 8B
    normals on one CPU thread takes minutes, on a GPU a second)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator(device=init_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, device=init_device, dtype=p.dtype).normal_(0.0, 0.02, generator=g))
        model.model.rotary_emb.__init__(cfg)  # its buffers were left empty on the meta device
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    p.add_argument("--recipe", default="gptq w4 g128 sym")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per pass through a block")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--progress", action="store_true", help="a progress bar per block")
    a = p.parse_args()
    import qfx

    rows = []
    for shape in a.shapes.split(","):
        model = random_model(shape, init_device="cuda" if a.device.startswith("cuda") else "cpu")
        vocab = SHAPES[shape]["vocab_size"]
        g = torch.Generator().manual_seed(1)
        calib = torch.randint(0, vocab, (a.samples, a.seq_len), generator=g).split(a.batch_size)
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        prepared = qfx.prepare(model, a.recipe)
        t_prep = time.time() - start
        qfx.calibrate(prepared, calib, progress=a.progress, device=a.device)
        t_cal = time.time() - start - t_prep
        qmodel = qfx.convert(prepared)
        total = time.time() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else None
        row = {"shape": shape, "recipe": a.recipe, "samples": a.samples, "seq_len": a.seq_len, "batch": a.batch_size,
               "capture_prepare_s": round(t_prep, 1), "calibrate_s": round(t_cal, 1), "total_s": round(total, 1),
               "peak_gpu_gib": None if peak is None else round(peak, 2),
               "model_device": str(next(qmodel.parameters()).device), "device": a.device}
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(rows, a)  # after every shape, so a run cut short keeps what it measured
        del model, prepared, qmodel


def write(rows: list[dict], a) -> None:
    import transformers

    header = {"date": datetime.date.today().isoformat(),
              "command": "python benchmarks/calib_speed.py " + " ".join(sys.argv[1:]),
              "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calib_speed.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    lines = ["# Calibration speed (block-by-block GPTQ, model in CPU memory)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + ["", "| shape | recipe | samples x seq (per pass) | capture+prepare s | "
              "calibrate s | total s | peak GPU GiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['recipe']} | {r['samples']} x {r['seq_len']} ({r['batch']}) | {r['capture_prepare_s']} | "
              f"{r['calibrate_s']} | {r['total_s']} | {r['peak_gpu_gib']} |" for r in rows]
    (out / "calib_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
