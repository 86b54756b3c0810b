"""One llm-compressor cell of the accuracy grid: quantize SmolLM2-135M with llm-compressor's
modifiers on the calibration samples qfx uses, and measure perplexity on the same windows.

Run with the python of an environment holding `llmcompressor` (a benchmark dependency, not a
qfx one) and qfx itself (for the model, the text and the perplexity loop):

    python benchmarks/peer_llmcompressor.py --method gptq --setting "W4A16 g64 asym" --eval-windows 8

Prints one JSON line: ppl, eval_windows, calib_samples, calib_seconds, peak_mem_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch


def scheme(setting: str):
    """W8A8 and W4A4 KV16: per-channel weights; the rest groups of 64. A8 / A4: dynamic per token."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits = int(setting[1])
    per_channel = setting in ("W8A8", "W4A4 KV16")
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric="asym" not in setting,
                               strategy="channel" if per_channel else "group", group_size=None if per_channel else 64)
    acts = None
    if "A8" in setting or "A4" in setting:
        acts = QuantizationArgs(num_bits=8 if "A8" in setting else 4, type="int", symmetric=True, strategy="token",
                                dynamic=True)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}


def rotations():
    """QuaRot's rotations as llm-compressor applies them: random-sign Hadamard R1 (residual
    stream), R2 (per head, v and o) and online R4 (before down_proj), none learned."""
    from llmcompressor.modifiers.transform import SpinQuantModifier

    return SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")


def modifiers(method: str, setting: str) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    groups = scheme(setting)
    ignore = ["lm_head"]
    if method == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=0.01)]
    if method == "awq":
        return [AWQModifier(config_groups=groups, ignore=ignore)]
    if method == "smoothquant":
        return [SmoothQuantModifier(smoothing_strength=0.5), QuantizationModifier(config_groups=groups, ignore=ignore)]
    if method == "smoothquant,gptq":
        return [SmoothQuantModifier(smoothing_strength=0.5),
                GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=0.01)]
    if method == "quarot":
        return [rotations(), QuantizationModifier(config_groups=groups, ignore=ignore)]
    if method == "quarot,gptq":
        return [rotations(), GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=0.01)]
    raise SystemExit(f"no llm-compressor recipe for method {method!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True)
    p.add_argument("--setting", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval", required=True)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib", default="wiki-summaries")
    p.add_argument("--calib-samples", type=int, default=128)
    a = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot

    from qfx.cli import _LogitsOf  # input_ids -> logits view of an HF model
    from qfx.data import calibration_samples, eval_windows, read_text, tokenize
    from qfx.eval import perplexity
    from qfx.models import load_hf

    model, tokenizer = load_hf(a.model, torch.bfloat16, a.device)
    # llm-compressor re-reads the config from the model's folder; a GGUF folder has none, and
    # the GGUF loader (which dequantizes every tensor to bf16) leaves a quantization_config behind
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder = tempfile.mkdtemp(prefix="peer-config-")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.config._name_or_path = folder
    samples = calibration_samples(tokenize(read_text(a.calib), tokenizer), a.calib_samples, a.seq_len, 0)
    windows = eval_windows(tokenize(read_text(a.eval), tokenizer), a.seq_len, a.eval_windows)
    ds = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    start = time.time()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=modifiers(a.method, a.setting),
                    num_calibration_samples=len(samples), max_seq_length=a.seq_len,
                    shuffle_calibration_samples=False)
    calib_seconds = time.time() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if a.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)

    with torch.no_grad():
        ppl = perplexity(_LogitsOf(model), windows, 1, a.device, False, "eval")
    print(json.dumps({"ppl": ppl, "eval_windows": int(windows.shape[0]), "calib_samples": int(samples.shape[0]),
                      "calib_seconds": round(calib_seconds, 3), "peak_mem_mb": round(peak, 1)}))


if __name__ == "__main__":
    main()
