"""The `qfx` command line: quantize a model, evaluate perplexity, print one JSON line. Its
arguments are defined in `qfx.cli_parser`; this module runs the commands.

    qfx quantize --model smollm2-135m --method rtn --w-bits 4 --w-group 64 --w-asym \
        --eval ../shared/data/wikitext2_test.txt --eval-windows 8 --output out/ --json
    qfx eval --model out/ --eval ../shared/data/wikitext2_test.txt --json
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from qfx.cli_parser import DTYPES, build_parser, recipe_string

__all__ = ["build_parser", "main", "recipe_string"]

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
    if a.stream or _too_large_for_memory(a, recipe):
        return _quantize_streaming(a, recipe, recipe_text, start)
    first = _join_process_group(a)
    home = "cpu" if a.offload else a.device  # where the model lives until it is quantized
    model, tokenizer = load_hf(a.model, DTYPES[a.dtype], home, progress=not a.quiet and first)
    windows = _windows(a, tokenizer)
    progress = not a.quiet and first
    ppl_fp = None
    if windows is not None and not a.no_fp_eval and first:
        ppl_fp = perplexity(_LogitsOf(model), windows, a.batch_size, home, progress, "eval fp")
    t_quant = time.time()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    save_rotations = None
    if a.rotation_out:
        from qfx.passes.rotate import save_rotations as write

        save_rotations = lambda rotations: write(rotations, a.rotation_out)  # noqa: E731
    timings: dict = {}
    qmodel = qfx.quantize(model, recipe, calib=lambda: _calibration_batches(a, tokenizer), progress=progress,
                          device=a.device, timings=timings, on_rotations=save_rotations)
    calib_used, calib_seconds = timings["calib_samples"], timings["calib_seconds"]
    if not first:
        return None  # every process calibrated; the first evaluates, saves and prints
    if home != a.device:
        from qfx.graph import retarget_devices

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


def _calibration_batches(a: argparse.Namespace, tokenizer) -> tuple[torch.Tensor, ...]:
    """--calib-samples windows of --seq-len tokens from --calib, in batches of --calib-batch-size."""
    from qfx.data import calibration_samples, read_text, tokenize

    data = calibration_samples(tokenize(read_text(a.calib), tokenizer), a.calib_samples, a.seq_len, a.seed)
    return data.split(a.calib_batch_size)


def _join_process_group(a: argparse.Namespace) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join its process group (NCCL on this process's GPU, gloo
    on CPUs) so that calibration is split across the processes. True on the first process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = a.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return not dist.is_initialized() or dist.get_rank() == 0


def _too_large_for_memory(a: argparse.Namespace, recipe) -> bool:
    """A local safetensors folder whose weights would not fit in the memory available now, with a
    recipe and an --output that streaming can serve (the reason is printed)."""
    from qfx.stream import WHOLE_MODEL_METHODS
    from qfx.weight_files import INDEX_FILE, SINGLE_FILE

    folder = Path(a.model)
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or not a.output or any(m in WHOLE_MODEL_METHODS for m in recipe.methods) or \
            not ((folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()):
        return False
    weights = sum(f.stat().st_size for f in files)
    available = _memory_available()
    if weights < 0.8 * available:
        return False
    print(f"qfx quantize: {a.model} holds {weights / 2**30:.1f} GiB of weights and {available / 2**30:.1f} GiB of "
          "memory is available: quantizing block by block from disk (as --stream)", file=sys.stderr)
    return True


def _memory_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable: free memory plus
    the page cache it can drop), or free pages where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _quantize_streaming(a: argparse.Namespace, recipe, recipe_text: str, start: float) -> dict:
    """`qfx quantize --stream`: weights read from disk and the result written block by block."""
    import qfx
    from qfx.eval import perplexity
    from qfx.models import ModelError
    from qfx.stream import quantize_streaming

    if a.model.endswith(".gguf") or not Path(a.model).is_dir():
        raise ModelError(f"--stream reads a model folder's safetensors shards; {a.model} is not a folder "
                         "(a GGUF file or the embedded model is loaded whole: drop --stream)")
    if not a.output:
        raise ModelError("--stream writes the quantized model as it goes: give --output FOLDER")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(a.model)
    except (OSError, ValueError) as e:
        raise ModelError(f"{a.model}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    first = _join_process_group(a)
    t_quant, timings = time.time(), {}
    quantize_streaming(a.model, recipe, a.output, calib=lambda: _calibration_batches(a, tokenizer), device=a.device,
                       dtype=DTYPES[a.dtype], progress=not a.quiet and first, tokenizer=tokenizer,
                       overwrite=a.overwrite, timings=timings)
    if not first:
        return None
    quant_seconds = time.time() - t_quant
    peak_gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1) if a.device.startswith("cuda") else None
    windows = _windows(a, tokenizer)
    ppl_q, task_results = None, {}
    if windows is not None or _task_names(a):
        qmodel = qfx.load(a.output, a.device)  # the quantized model, which fits where the original did not
        if windows is not None:
            ppl_q = perplexity(qmodel, windows, a.batch_size, a.device, not a.quiet, "eval quant")
        if _task_names(a):
            task_results = _tasks(a, qmodel, tokenizer, a.device, "_quant")
    return {
        "model": a.model, "method": ",".join(recipe.methods), "recipe": recipe_text, "streamed": True,
        "ppl_fp": None, "ppl_quant": ppl_q, **_protocol(a, windows), **task_results,
        "calib_source": a.calib if timings["calib_samples"] else None, "calib_samples": timings["calib_samples"],
        "quantize_seconds": round(quant_seconds, 3), "calib_seconds": round(timings["calib_seconds"], 3),
        "peak_gpu_mb": peak_gpu,
        "seconds": round(time.time() - start, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(a.output).glob("*.safetensors")),
        "output": a.output, "device": a.device, "dtype": a.dtype,
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
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"qfx {args.command}: error: disk full writing {e.filename or 'the output'} ({e.strerror}); the partial "
              "output was removed: free some space or choose another --output", file=sys.stderr)
        return 2
    if result is None:  # a process of a torchrun group other than the first
        return 0
    if args.json:
        print(json.dumps(result))
    elif args.command != "generate":  # generate has printed its text
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
