"""Where one decode step of a random-weight Llama-3-8B-shaped model spends its GPU time (CUDA only).

    python benchmarks/profile_decode.py --layers 4 --variants "bf16;w4 g128 asym;w8 g0 a8" --out benchmarks/results

Builds the model as `bench_e2e.py` does, quantizes it with each calibration-free recipe (round
to nearest: the kernels do not depend on how the codes were chosen), and generates with
`qfx.Generator` at batch 1 (compiled decode step replayed as a CUDA graph). Times `--steps`
decode steps, then profiles as many more with torch.profiler and groups the GPU time by kernel
family. The floor of a step is the bytes it must read (every linear's weights with their
scales and zero points, the embedding row and LM head, the KV cache up to the position) over
the copy bandwidth measured in the same run. A variant ending in ":in-gemm" runs the same recipe
with the activation quantization left inside the GEMMs (backend pass `quantize_in_producer`
off), to measure what quantizing in the norm's kernel changes.
Use few layers: every layer runs the same kernels. Writes decode_profile.json and
decode_profile.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e  # noqa: E402
import qfx  # noqa: E402
from results_notes import write_keeping_notes  # noqa: E402

FAMILIES = [  # (family, substrings of a kernel name), first match wins
    ("weight-only GEMM (qfx)", ("_wint_a16", "_wint_gemv", "_dequant_t")),
    ("int8/fp8 GEMM (qfx)", ("_act_quant_gemm",)),
    ("activation quantization (qfx pass)", ("_quantize_rows", "hadamard")),
    ("split-K reduction", ("split", "_reduce")),
    ("cuBLAS / CUTLASS GEMM", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "splitKreduce")),
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    ("Inductor fused ops", ("triton_",)),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other"


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 4 * 10 / (time.perf_counter() - start)


def step_bytes(gen: qfx.Generator, position: int) -> int:
    """Bytes one decode step must read: every tensor of the graph but the embedding (one row)
    and the KV cache (up to `position`)."""
    kv = {id(b) for b in gen.graph.kv_cache.buffers()}
    total = 0
    for name, t in list(gen.graph.named_parameters()) + list(gen.graph.named_buffers()):
        if id(t) in kv:
            continue
        total += t.shape[-1] * t.element_size() if "embed" in name else t.numel() * t.element_size()
    total += gen.kv_cache_bytes() * position // gen.length
    return total


def profile_variant(model, cfg, variant: str, steps: int, prompt: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    recipe, _, mode = variant.partition(":")
    torch._dynamo.reset()
    source = model if recipe == "bf16" else qfx.quantize(model, recipe, progress=False)
    patched = None
    if mode == "in-gemm":
        import qfx.lowering.quantize_in_producer as qp

        patched = qp.quantize_in_producer
        qp.quantize_in_producer = lambda gm, example_inputs: {}
    try:
        gen = qfx.Generator.from_model(source, max_batch=1, max_length=prompt + 2 * steps + 16)
        ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            gen.generate(ids, max_new_tokens=4, eos_token_id=[])
        out = gen.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])
        with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
            gen.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])  # returns after its last sync
    finally:
        if patched is not None:
            qp.quantize_in_producer = patched
    by_family: dict[str, float] = defaultdict(float)
    kernels = []
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0:
            continue
        by_family[family(e.key)] += us
        kernels.append((e.key, us, e.count))
    total = sum(by_family.values()) or 1.0  # no GPU kernels (a CPU run): shares of 0
    kernels.sort(key=lambda k: -k[1])
    row = {"variant": variant, "layers": cfg.num_hidden_layers, "decode_tokens_per_s": out.decode_tokens_per_s,
           "step_ms": 1e3 / out.decode_tokens_per_s, "step_bytes": step_bytes(gen, prompt + steps),
           "gpu_share": {f: us / total for f, us in sorted(by_family.items(), key=lambda kv: -kv[1])},
           "top_kernels": [{"name": k[:90], "share": us / total, "calls": c} for k, us, c in kernels[:12]]}
    print(json.dumps(row), flush=True)
    del gen
    return row


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    bw = meta["copy_bandwidth_GBps"]
    lines = ["# One decode step, batch 1, Llama-3-8B-shaped layers", "",
             f"{meta['date']}, {meta['device']}, torch {meta['torch']}. Command: `{meta['command']}`", "",
             f"{meta['layers']} layers (every layer runs the same kernels); copy bandwidth measured in this run "
             f"{bw:.0f} GB/s. Floor = bytes a step must read / that bandwidth. GPU time shares come from "
             f"torch.profiler over {meta['steps']} decode steps (the prefill of {meta['prompt']} tokens included).", "",
             "| variant | step ms | floor ms | of floor | tokens/s | where the GPU time goes |", "|---|---|---|---|---|---|"]
    for r in rows:
        floor = r["step_bytes"] / (bw * 1e9) * 1e3
        shares = ", ".join(f"{f} {s:.0%}" for f, s in r["gpu_share"].items() if s >= 0.01)
        lines.append(f"| {r['variant']} | {r['step_ms']:.3f} | {floor:.3f} | {floor / r['step_ms']:.0%} | "
                     f"{r['decode_tokens_per_s']:.1f} | {shares} |")
    lines += ["", "Largest kernels per variant (share of GPU time, calls):", ""]
    for r in rows:
        lines.append(f"- {r['variant']}: " + "; ".join(f"`{k['name']}` {k['share']:.0%} ({k['calls']})"
                                                      for k in r["top_kernels"][:6]))
    write_keeping_notes(out / "decode_profile.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", default="bf16;w4 g128 asym", help="';'-separated: bf16 or calibration-free recipes, "
                    "each optionally with ':in-gemm'")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py profiles CUDA kernels; no CUDA device here")
    model, cfg = bench_e2e.build_model(args.layers)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "command": "python benchmarks/profile_decode.py " + " ".join(
                repr(a) if " " in a or ";" in a else a for a in sys.argv[1:]),
            "layers": args.layers, "steps": args.steps, "prompt": args.prompt,
            "copy_bandwidth_GBps": copy_bandwidth() / 1e9}
    rows = []
    for variant in args.variants.split(";"):
        rows.append(profile_variant(model, cfg, variant, args.steps, args.prompt))
        write(Path(args.out), meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
