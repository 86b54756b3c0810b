"""End-to-end decode speed of a random-weight Llama-3-8B-shaped model (CUDA only).

    python benchmarks/bench_e2e.py --out benchmarks/results

Variants: bf16 (Inductor), qfx W4A16 g128 asym and qfx W8A8 (quantized while compiling:
`torch.compile(model, backend="qfx", options={"recipe": ...})`), torchao int4 weight-only
(tinygemm). Each runs a static KV cache (transformers' StaticCache) and a compiled one-token
decode step replayed as a CUDA graph; the prompt is filled by one eager forward (its speed is
not measured). tokens/s = batch * steps / wall time of `steps` decode steps after warm-up.
Prefill (`--prefill`) times one compiled forward of batch 1 x 2048 tokens. Results are written
after every measurement (e2e.json, e2e.md), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qfx  # noqa: E402,F401  (registers the "qfx" backend)

RECIPES = {"qfx_w4a16": "w4 g128 asym", "qfx_w8a8": "w8 g0 a8"}


def build_model(layers: int):
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, cfg


def compile_step(model, variant: str):
    if variant in RECIPES:
        opts = {"recipe": RECIPES[variant], "triton.cudagraphs": True}
        return lambda fn: torch.compile(fn, backend="qfx", options=opts, dynamic=False)
    return lambda fn: torch.compile(fn, mode="reduce-overhead", dynamic=False)


def decode_tokens_per_s(model, cfg, variant: str, batch: int, prompt: int, steps: int) -> float:
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"))

        def step(tok, pos):
            return model(input_ids=tok, past_key_values=cache, cache_position=pos).logits

        compiled = compile_step(model, variant)(step)
        # the same strides as the argmax tokens fed back later: a stride change recompiles the step
        tok = ids[:, -1:].clone(memory_format=torch.contiguous_format).as_strided((batch, 1), (1, 1))
        for i in range(3):  # compile, record the CUDA graph, replay once
            compiled(tok, torch.tensor([prompt + i], device="cuda"))
        torch.cuda.synchronize()
        positions = [torch.tensor([prompt + 3 + i], device="cuda") for i in range(steps)]
        start = time.perf_counter()
        for pos in positions:
            logits = compiled(tok, pos)
            tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - start)


def prefill_ms(model, cfg, variant: str, tokens: int = 2048) -> float:
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
    with torch.no_grad():
        compiled = compile_step(model, variant)(lambda x: model(input_ids=x, use_cache=False).logits)
        for _ in range(3):
            compiled(ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            compiled(ids)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 5 * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variants", default="bf16,qfx_w4a16,qfx_w8a8,torchao_int4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e.py measures CUDA decode speed; no CUDA device here")
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "command": "python " + " ".join(sys.argv), "layers": args.layers, "prompt": args.prompt,
            "steps": args.steps}
    rows: list[dict] = []

    def save():
        (out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = [f"# End-to-end decode, Llama-3-8B-shaped random weights ({args.layers} layers)", "",
                 f"{meta['date']}, {meta['device']}, torch {torch.__version__}, transformers {transformers.__version__}.",
                 f"Command: `{meta['command']}`", "", "| variant | measure | value |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['measure']} | {r['value']:.1f} |" for r in rows]
        (out / "e2e.md").write_text("\n".join(lines) + "\n")

    model, cfg = build_model(args.layers)
    variants = args.variants.split(",")
    # torchao's quantize_ replaces the model's linears in place: every other variant runs first
    variants.sort(key=lambda v: v == "torchao_int4")
    for variant in variants:
        if variant == "torchao_int4":
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                      filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
        for batch in [int(b) for b in args.batches.split(",")]:
            torch._dynamo.reset()
            tps = decode_tokens_per_s(model, cfg, variant, batch, args.prompt, args.steps)
            rows.append({"variant": variant, "measure": f"decode tokens/s, batch {batch}", "value": tps})
            print(json.dumps(rows[-1]), flush=True)
            save()
        if args.prefill:
            torch._dynamo.reset()
            rows.append({"variant": variant, "measure": "prefill ms, 1 x 2048", "value": prefill_ms(model, cfg, variant)})
            print(json.dumps(rows[-1]), flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
