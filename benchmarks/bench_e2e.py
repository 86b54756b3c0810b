"""End-to-end generation speed of a random-weight Llama-3-8B-shaped model (CUDA only).

    python benchmarks/bench_e2e.py --out benchmarks/results

Variants:
- `bf16`: the unquantized model through qfx's generation graph (`qfx.Generator`), compiled by
  the qfx backend (Inductor alone, as nothing is quantized);
- `ckpt:<recipe>`: the model quantized by `qfx.quantize` (calibration on random tokens where
  the recipe needs it: enough for speed), saved with `qfx.save`, loaded back with
  `qfx.load` and generated from with `qfx.Generator` (its KV cache stored as the recipe says);
- `otf:<recipe>`: the same recipe quantized while compiling the Hugging Face model
  (`torch.compile(model, backend="qfx", options={"recipe": ...})`) over transformers'
  StaticCache, the path the earlier benchmark measured;
- `torchao_int4`: torchao's int4 weight-only (tinygemm) over the StaticCache, when torchao is installed.
Each measurement: a prompt of `--prompt` random tokens per row, `--steps` decode steps after
a warm-up generation of the same shapes (compilation, CUDA-graph recording); tokens/s = batch
x steps / decode time. Time to first token: one prefill of `--ttft-prompt` tokens at batch 1
after a warm-up of the same length. Peak GPU memory is that of the measured generation,
the KV cache's bytes beside it. Results are rewritten after every measurement (e2e.json,
e2e.md), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qfx  # noqa: E402


def build_model(layers: int):
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, cfg


def generator_rows(gen: qfx.Generator, vocab: int, batch: int, prompt: int, steps: int, label: str) -> dict:
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))
    gen.generate(ids, max_new_tokens=4, eos_token_id=[])  # compile prefill and decode, record the CUDA graph
    gen.generate(ids, max_new_tokens=4, eos_token_id=[])
    out = gen.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])
    return {"variant": label, "batch": batch, "decode_tokens_per_s": out.decode_tokens_per_s,
            "peak_gpu_mb": out.peak_gpu_mb, "kv_cache_mb": gen.kv_cache_bytes() / 2**20}


def ttft_row(gen: qfx.Generator, vocab: int, prompt: int, label: str) -> dict:
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        gen.generate(ids, max_new_tokens=1, eos_token_id=[])
    out = gen.generate(ids, max_new_tokens=1, eos_token_id=[])
    return {"variant": label, "batch": 1, "ttft_ms": out.prefill_seconds * 1e3, "prompt": prompt}


def static_cache_tokens_per_s(model, cfg, recipe: str | None, batch: int, prompt: int, steps: int) -> float:
    """transformers' StaticCache and a compiled one-token step (on-the-fly qfx, or torchao)."""
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"))

        def step(tok, pos):
            return model(input_ids=tok, past_key_values=cache, cache_position=pos).logits

        if recipe is not None:
            compiled = torch.compile(step, backend="qfx", options={"recipe": recipe, "triton.cudagraphs": True},
                                     dynamic=False)
        else:
            compiled = torch.compile(step, mode="reduce-overhead", dynamic=False)
        tok = ids[:, -1:].clone(memory_format=torch.contiguous_format).as_strided((batch, 1), (1, 1))
        for i in range(3):
            compiled(tok, torch.tensor([prompt + i], device="cuda"))
        torch.cuda.synchronize()
        positions = [torch.tensor([prompt + 3 + i], device="cuda") for i in range(steps)]
        start = time.perf_counter()
        for pos in positions:
            logits = compiled(tok, pos)
            tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - start)


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """Rewrite e2e.json and e2e.md from the run's metadata and rows."""
    (out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [f"# End-to-end generation, Llama-3-8B-shaped random weights ({meta['layers']} layers)", "",
             f"{meta['date']}, {meta['device']}, {versions}.", "",
             "Commands (in order; a later one replaces the rows of the variants it names):", "",
             *[f"    {c}" for c in meta["commands"]], "",
             f"Decode: prompt {meta['prompt']} tokens per row, {meta['steps']} steps after a warm-up; "
             "TTFT: one prefill at batch 1.", "",
             *[f"- {n}" for n in meta.get("notes", [])], "",
             "| variant | batch | decode tokens/s | TTFT ms | peak GPU MiB | KV cache MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda k, f: format(r[k], f) if r.get(k) is not None else ""  # noqa: E731
        lines.append(f"| {r['variant']} | {r['batch']} | {cell('decode_tokens_per_s', '.1f')} | "
                     f"{cell('ttft_ms', '.1f')} | {cell('peak_gpu_mb', '.0f')} | {cell('kv_cache_mb', '.0f')} |")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variants", default="bf16;ckpt:gptq w4 g128 asym;otf:w4 g128 asym",
                    help="separated by ';' (recipes may hold commas)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ttft-prompt", type=int, default=2048)
    ap.add_argument("--calib", default="4x512", help="random calibration tokens, SAMPLESxLEN")
    ap.add_argument("--ckpt-dir", default="/tmp/qfx-e2e")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of the existing e2e.json (a run split over several processes); "
                         "rows of the variants measured now are replaced")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e.py measures CUDA generation speed; no CUDA device here")
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "commands": ["python benchmarks/bench_e2e.py " + " ".join(repr(a) if " " in a else a for a in sys.argv[1:])],
            "layers": args.layers, "prompt": args.prompt, "steps": args.steps}
    rows: list[dict] = []
    variants = args.variants.split(";")
    if args.append and (out / "e2e.json").exists():
        before = json.loads((out / "e2e.json").read_text())
        meta["commands"] = before["meta"]["commands"] + meta["commands"]
        meta["notes"] = before["meta"].get("notes", [])
        rows = [r for r in before["rows"] if r["variant"] not in variants]

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(out, meta, rows)

    batches = [int(b) for b in args.batches.split(",")]
    model, cfg = build_model(args.layers)
    n, s = (int(x) for x in args.calib.split("x"))
    calib = torch.randint(0, cfg.vocab_size, (n, s), generator=torch.Generator().manual_seed(0)).split(2)
    length = args.prompt + args.steps + 8
    variants.sort(key=lambda v: v == "torchao_int4")  # torchao rewrites the model in place: last
    for variant in variants:
        torch._dynamo.reset()
        kind, _, recipe = variant.partition(":")
        if kind in ("otf", "torchao_int4"):
            if kind == "torchao_int4":
                from torchao.quantization import Int4WeightOnlyConfig, quantize_

                quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
            for b in batches:
                torch._dynamo.reset()
                tps = static_cache_tokens_per_s(model, cfg, recipe or None, b, args.prompt, args.steps)
                record({"variant": variant, "batch": b, "decode_tokens_per_s": tps})
            continue
        if kind == "bf16":
            source = model
        else:  # quantize, save, free, load back
            start = time.time()
            qmodel = qfx.quantize(model, recipe, calib=calib, progress=False, device="cuda")
            path = Path(args.ckpt_dir) / recipe.replace(" ", "_")
            qfx.save(qmodel, path, overwrite=True)
            del qmodel
            gc.collect()
            torch.cuda.empty_cache()
            source = qfx.load(path, device="cuda")
            print(f"{variant}: quantized, saved, loaded in {time.time() - start:.0f} s", flush=True)
        gen = qfx.Generator.from_model(source, max_batch=max(batches), max_length=length)
        for b in batches:
            record(generator_rows(gen, cfg.vocab_size, b, args.prompt, args.steps, variant))
        del gen
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        gen = qfx.Generator.from_model(source, max_batch=1, max_length=args.ttft_prompt + 8)
        record(ttft_row(gen, cfg.vocab_size, args.ttft_prompt, variant))
        del gen, source
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(args.ckpt_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
