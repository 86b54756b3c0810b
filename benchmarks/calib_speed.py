"""Calibration speed and memory of block-by-block GPTQ on random-weight models of real shapes,
from a folder on disk: loaded whole into memory, or streamed block by block (`qfx.stream`).

    python benchmarks/calib_speed.py --device cuda --shapes smollm2-135m,llama3-8b --disk /tmp/calib \
        --out benchmarks/results

Each shape is written once as a sharded bf16 safetensors folder under --disk (random weights
N(0, 0.02), drawn on the device: speed depends on shapes, not values). Then, each in its own
process so that its peak host memory (ru_maxrss) is its own:
- in memory: `from_pretrained`, `qfx.quantize(..., device=...)` (one block on the device at a
  time, the model in CPU memory), `qfx.save`;
- streamed: `qfx.quantize_streaming` reads each block from the shards and writes the result
  as it goes;
- load: `qfx.load` of the streamed result.
Calibration tokens are random ids (128 x 2048 by default), through each block 8 samples at a
time (--batch-size); they stay on the device between blocks. Also written: a projection to
70B and 405B shapes from the streamed 8B run's per-block cost. Rewrites calib_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = {  # LlamaConfig fields
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
PROJECTED = {  # shapes only projected: (hidden, intermediate, layers, kv heads / heads)
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, kv_ratio=8 / 64),
    "llama3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, kv_ratio=8 / 128),
}


def block_params(hidden: int, intermediate: int, kv_ratio: float) -> int:
    """Weights of one Llama block: q, o (h x h), k, v (h x h*kv_ratio), gate, up, down (h x i)."""
    return int(2 * hidden * hidden + 2 * hidden * hidden * kv_ratio + 3 * hidden * intermediate)


def write_random_folder(shape: str, folder: Path, device: str) -> None:
    """The shape as an HF folder of bf16 safetensors shards, written tensor by tensor (never the
    whole model in host memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return
    from qfx.stream import empty_hf_model

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype="bfloat16").save_pretrained(tmp)
    model = empty_hf_model(tmp, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    shard, size, weight_map, n = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, n
        n += 1
        save_file(shard, str(tmp / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0

    for name, p in model.named_parameters():  # tied weights once, as save_pretrained stores them
        t = torch.ones(p.shape, dtype=p.dtype) if p.dim() == 1 else \
            torch.empty(p.shape, device=device, dtype=p.dtype).normal_(0.0, 0.02, generator=g).cpu()
        shard[name], size = t, size + t.numel() * 2
        if size >= 2**31:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)


def run_mode(a, shape: str, mode: str) -> dict:
    """One mode in this process; returns its row."""
    import qfx

    folder, out = Path(a.disk) / shape, Path(a.disk) / f"{shape}-{mode}-out"
    vocab = SHAPES[shape]["vocab_size"]
    calib = torch.randint(0, vocab, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(1))
    calib = calib.split(a.batch_size)
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    timings: dict = {}
    row: dict = {"shape": shape, "mode": mode}
    start = time.time()
    if mode == "in memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        row["load_s"] = round(time.time() - start, 1)
        qmodel = qfx.quantize(model, a.recipe, calib=calib, device=a.device, progress=False, timings=timings)
        t = time.time()
        qfx.save(qmodel, out, overwrite=True)
        row["save_s"] = round(time.time() - t, 1)
    elif mode == "streamed":
        qfx.quantize_streaming(folder, a.recipe, out, calib=calib, device=a.device, progress=False,
                               overwrite=True, timings=timings)
    else:  # load the streamed result
        qfx.load(Path(a.disk) / f"{shape}-streamed-out")
        out = Path(a.disk) / f"{shape}-streamed-out"
    row["total_s"] = round(time.time() - start, 1)
    if "calib_seconds" in timings:
        row["calibrate_s"] = round(timings["calib_seconds"], 1)
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    row["folder_gib"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 2)
    row["output_gib"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    p.add_argument("--modes", default="streamed,load,in memory")
    p.add_argument("--recipe", default="gptq w4 g128 sym")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per pass through a block")
    p.add_argument("--disk", default="/tmp/qfx-calib-speed", help="where the random models and results are written")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)  # a child process's job
    a = p.parse_args()
    if a.one:
        print("ROW " + json.dumps(run_mode(a, *a.one)), flush=True)
        return
    rows = []
    for shape in a.shapes.split(","):
        t = time.time()
        write_random_folder(shape, Path(a.disk) / shape, a.device)
        print(f"{shape}: folder ready in {time.time() - t:.0f} s", flush=True)
        for mode in a.modes.split(","):
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", shape, mode],
                                   capture_output=True, text=True, cwd=ROOT)
            found = [ln[4:] for ln in child.stdout.splitlines() if ln.startswith("ROW ")]
            if child.returncode != 0 or not found:
                print(child.stdout[-2000:], child.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{shape} {mode}: failed")
            rows.append(json.loads(found[0]))
            print(json.dumps(rows[-1]), flush=True)
            write(rows, a)  # after every measurement, so a run cut short keeps what it measured


def projection(rows: list[dict], samples: int, seq_len: int) -> list[dict]:
    """Streamed 70B / 405B from the streamed 8B row: time and disk read scale with each
    block's weights (GPTQ's cost per block: the matmuls over the tokens plus the solves, both
    growing with the weights for these shapes), host memory with one block plus one output
    shard, activations with hidden size."""
    base = next((r for r in rows if r["shape"] == "llama3-8b" and r["mode"] == "streamed"), None)
    if base is None:
        return []
    s = SHAPES["llama3-8b"]
    b8 = block_params(s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] / s["num_attention_heads"])
    per_block_s = base["calibrate_s"] / s["num_hidden_layers"]
    out = []
    for name, p in PROJECTED.items():
        b = block_params(p["hidden_size"], p["intermediate_size"], p["kv_ratio"])
        ratio = b / b8
        acts = 2 * samples * seq_len * p["hidden_size"] * 2 / 2**30  # two bf16 streams (inputs, outputs)
        out.append({"shape": name, "layers": p["num_hidden_layers"], "block_gib": round(b * 2 / 2**30, 2),
                    "time_min": round(per_block_s * ratio * p["num_hidden_layers"] / 60, 0),
                    "host_gib": round(base["peak_rss_gib"] - b8 * 2 / 2**30 + b * 2 / 2**30, 1),
                    "activations_gib": round(acts, 1),
                    "disk_read_gib": round(b * 2 * p["num_hidden_layers"] / 2**30, 0)})
    return out


def write(rows: list[dict], a) -> None:
    import transformers

    header = {"date": datetime.date.today().isoformat(),
              "command": "python benchmarks/calib_speed.py " + " ".join(sys.argv[1:]),
              "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "recipe": a.recipe, "calibration": f"{a.samples} x {a.seq_len} random ids, {a.batch_size} per pass"}
    proj = projection(rows, a.samples, a.seq_len)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calib_speed.json").write_text(json.dumps({**header, "rows": rows, "projection": proj}, indent=1))
    lines = ["# Calibration speed and memory (block-by-block GPTQ), in memory and streamed from disk", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["| shape | mode | load s | calibrate s | save s | total s | peak host RSS GiB | peak GPU GiB | "
              "folder GiB | output GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.get(k, "") for k in ("load_s", "calibrate_s", "save_s", "total_s", "peak_rss_gib", "peak_gpu_gib",
                                         "folder_gib", "output_gib")]
        lines.append(f"| {r['shape']} | {r['mode']} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Streamed: load and save happen inside the total, block by block. Load: `qfx.load` of the "
              "streamed result (its peak host RSS against the output's size)."]
    if proj:
        lines += ["", "## Projection (not measured): streamed, from the 8B row's per-block cost", "",
                  "| shape | layers | one block GiB (bf16) | time min | peak host GiB | activations on the device GiB "
                  "| disk read GiB |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['layers']} | {r['block_gib']} | {r['time_min']:.0f} | {r['host_gib']} | "
                  f"{r['activations_gib']} | {r['disk_read_gib']:.0f} |" for r in proj]
        lines += ["", "Time and disk read scale the 8B per-block cost by each block's weights; host memory is the "
                  "8B peak with one 8B block replaced by one block of the shape; activations are the two bf16 "
                  "streams (a block's inputs and outputs) of the calibration set. GPU memory is not projected."]
    from results_notes import write_keeping_notes

    write_keeping_notes(out / "calib_speed.md", "\n".join(lines))


if __name__ == "__main__":
    main()
