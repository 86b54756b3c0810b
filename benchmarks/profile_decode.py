"""Where one decode step of a random-weight Llama-3-8B-shaped model spends its GPU time (CUDA only).

    python benchmarks/profile_decode.py --layers 4 --variants bf16,qfx_w4a16

Builds the model and the compiled step as `bench_e2e.py` does (static KV cache, CUDA graph),
times 10 steps, then prints torch.profiler's kernel table for 10 more. Use few layers: every
layer runs the same kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e  # noqa: E402


def profile_variant(model, cfg, variant: str, prompt: int = 128, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    torch._dynamo.reset()
    cache = StaticCache(config=cfg, max_cache_len=prompt + 32)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"))
        compiled = bench_e2e.compile_step(model, variant)(
            lambda tok, pos: model(input_ids=tok, past_key_values=cache, cache_position=pos).logits)
        tok = ids[:, -1:].clone(memory_format=torch.contiguous_format).as_strided((1, 1), (1, 1))
        for i in range(3):  # compile, record the CUDA graph, replay once
            compiled(tok, torch.tensor([prompt + i], device="cuda"))
        torch.cuda.synchronize()
        positions = [torch.tensor([prompt + 3 + i], device="cuda") for i in range(20)]
        start = time.perf_counter()
        for pos in positions[:10]:
            tok = compiled(tok, pos)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        print(f"{variant}: {(time.perf_counter() - start) / 10 * 1e3:.3f} ms per step", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for pos in positions[10:]:
                tok = compiled(tok, pos)[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", default="bf16,qfx_w4a16", help="comma list of bf16, " + ", ".join(bench_e2e.RECIPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py profiles CUDA kernels; no CUDA device here")
    model, cfg = bench_e2e.build_model(args.layers)
    for variant in args.variants.split(","):
        if variant != "bf16" and variant not in bench_e2e.RECIPES:
            raise SystemExit(f"unknown variant {variant!r}: choose bf16 or one of {sorted(bench_e2e.RECIPES)}")
        profile_variant(model, cfg, variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
