"""Per-layer quantization report: where the error is, and which inputs have outliers.

For every quantized linear, on calibration text run through the full-precision model:
- weight SQNR (dB) of the dequantized weight against the original,
- output SQNR (dB) and cosine of the quantized op against the full-precision layer, both fed
  the same full-precision inputs (so each number is that layer's own error),
- input kurtosis (3 for a Gaussian; large values mean a few huge channels) and the
  max/RMS ratio of the inputs (the outlier magnitude activation quantization must cover),
- the bits used.
Written as report.md (a table), report.json, and two plots (error_by_layer.png,
outliers_by_layer.png).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.fx import GraphModule

from qfx.formats import quantized_layers
from qfx.ops import QuantizedLinearArgs, dequantize_packed, quantized_linear_ref

MAX_ROWS = 4096  # input rows kept per layer: enough for stable statistics, bounded memory


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (test.double() - ref.double()).pow(2).sum()
    signal = ref.double().pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(signal / noise))


def kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    centered = x - x.mean()
    var = centered.pow(2).mean()
    return float(centered.pow(4).mean() / var.pow(2)) if var > 0 else float("nan")


def layer_report(fp_model: torch.nn.Module, qmodel: GraphModule, batches) -> list[dict]:
    """Rows of per-layer statistics; `fp_model` is the full-precision HF model `qmodel` came from."""
    layers = {layer.path: layer for layer in quantized_layers(qmodel)}
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    hooks = []
    for path in layers:
        module = fp_model.get_submodule(path)

        def keep(_mod, args, path=path):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            have = sum(r.shape[0] for r in inputs[path])
            if have < MAX_ROWS:
                inputs[path].append(rows[: MAX_ROWS - have].float().cpu())

        hooks.append(module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for batch in batches:
                fp_model(input_ids=batch.to(next(fp_model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for path, layer in layers.items():
        x = torch.cat(inputs[path])
        w = fp_model.get_submodule(path).weight.detach().float().cpu()
        if tuple(w.shape) != (layer.plan.out_features, layer.plan.in_features):
            w = w.t()  # Conv1D stores (in, out)
        plan = layer.plan
        a_bits = 16 if plan.act is None else plan.act.bits
        op = QuantizedLinearArgs(x, layer.qweight.cpu(), layer.w_scale.cpu(),
                                 None if layer.w_zero is None else layer.w_zero.cpu(), None, w_bits=plan.weight.bits,
                                 group_size=plan.weight.group_size or 0, in_features=plan.in_features, a_bits=a_bits,
                                 a_scale=None if layer.a_scale is None else layer.a_scale.cpu())
        w_q = dequantize_packed(op.qweight, op.w_scale, op.w_zero, op.w_bits, op.group_size, op.in_features)
        y_fp = x @ w.t()
        y_q = quantized_linear_ref(*op).float()
        cos = torch.nn.functional.cosine_similarity(y_fp.flatten().double(), y_q.flatten().double(), dim=0)
        rms = x.pow(2).mean().sqrt()
        rows.append({
            "layer": path,
            "weight": plan.weight.short(),
            "act": plan.act.short() if plan.act is not None else "fp",
            "weight_sqnr_db": round(sqnr_db(w, w_q), 2),
            "output_sqnr_db": round(sqnr_db(y_fp, y_q), 2),
            "output_cosine": round(float(cos), 6),
            "input_kurtosis": round(kurtosis(x), 2),
            "input_max_over_rms": round(float(x.abs().max() / rms), 2) if rms > 0 else math.nan,
            "tokens": int(x.shape[0]),
        })
    return rows


def write_report(rows: list[dict], out_dir, title: str = "qfx quantization report") -> Path:
    """report.md, report.json and two PNG plots in `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    cols = ["layer", "weight", "act", "weight_sqnr_db", "output_sqnr_db", "output_cosine", "input_kurtosis",
            "input_max_over_rms"]
    worst = sorted(rows, key=lambda r: r["output_sqnr_db"])[:5]
    lines = [f"# {title}", "", f"{len(rows)} quantized linears; {rows[0]['tokens'] if rows else 0} calibration "
             "tokens per layer. Output SQNR compares each quantized layer with its full-precision self on the "
             "same full-precision inputs.", "", "Lowest output SQNR (candidates for more bits): "
             + ", ".join(f"`{r['layer']}` ({r['output_sqnr_db']} dB)" for r in worst), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plots(rows, out)
    return out


def _plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = range(len(rows))
    kinds = sorted({r["layer"].rsplit(".", 1)[-1] for r in rows})
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for kind in kinds:
        pts = [(i, r) for i, r in enumerate(rows) if r["layer"].rsplit(".", 1)[-1] == kind]
        ax.plot([i for i, _ in pts], [r["output_sqnr_db"] for _, r in pts], "o-", ms=3, label=kind)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("output SQNR (dB), higher is better")
    ax.set_title("Quantization error by layer")
    ax.legend(ncol=min(len(kinds), 7), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "error_by_layer.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.semilogy(list(idx), [r["input_max_over_rms"] for r in rows], "o-", ms=3, label="max |x| / rms(x)")
    ax.semilogy(list(idx), [r["input_kurtosis"] for r in rows], "s-", ms=3, label="kurtosis")
    ax.set_xlabel("layer (graph order)")
    ax.set_title("Activation outliers at each quantized layer's input")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "outliers_by_layer.png", dpi=110)
    plt.close(fig)
