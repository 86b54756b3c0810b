"""Every causal LM architecture transformers ships, built tiny, through every qfx method.

    python benchmarks/architectures.py [--types llama,gpt2] [--output benchmarks/results/architectures.md]

Rewrites its one results file: a table architecture x method -> ok / refused (why) /
error, and the architectures that cannot be built tiny with the reason. See
`tests/architectures.py` for how models are built and outcomes classified.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from tests.architectures import METHODS, Unbuildable, model_types, run, tiny_model_of  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    p.add_argument("--output", default="benchmarks/results/architectures.md")
    p.add_argument("--update", action="store_true", help="rerun only --types, keeping the other rows of --output")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (one architecture each)")
    a = p.parse_args()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    types = a.types.split(",") if a.types else model_types()
    rows, unbuildable = [], []
    start = time.time()
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for t, (cls, outcomes) in zip(types, pool.map(_one, types)):
            if cls is None:
                unbuildable.append((t, outcomes))
                print(f"{t}: cannot be built tiny: {outcomes}", flush=True)
            else:
                rows.append((t, cls, outcomes))
                print(f"{t}: {' | '.join(o[:60] for o in outcomes)}", flush=True)
    command = " ".join(sys.argv)
    if a.update:  # keep the other architectures' rows of the existing table
        kept_rows, kept_unbuildable, old_command = _read(Path(a.output), set(types))
        rows = sorted(kept_rows + rows)
        unbuildable = sorted(kept_unbuildable + unbuildable)
        types = model_types()
        command = f"{old_command}`, then `python {command}"
    _write(Path(a.output), rows, unbuildable, types, time.time() - start, command)


def _read(path: Path, replaced: set[str]):
    """Rows and unbuildable entries of an existing table, minus `replaced`, and its command."""
    rows, unbuildable, command, section = [], [], "", "rows"
    for line in path.read_text().splitlines():
        if line.startswith("- Command: `python "):
            command = line.split("`python ", 1)[1].rsplit("` (", 1)[0]
        elif line.startswith("## Cannot be built tiny"):
            section = "unbuildable"
        elif line.startswith("| ") and not line.startswith(("| architecture", "|---")):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            if cells[0] in replaced:
                continue
            if section == "rows":
                rows.append((cells[0], cells[1], cells[2:]))
            else:
                unbuildable.append((cells[0], cells[1]))
    return rows, unbuildable, command


def _one(model_type: str):
    """(class name, outcomes per method), or (None, why it cannot be built tiny); in a worker."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    try:
        model = tiny_model_of(model_type)
    except Unbuildable as e:
        return None, str(e)
    return type(model).__name__, [run(model, m) for m in METHODS]


def _cell(outcome: str) -> str:
    return outcome.replace("|", "\\|")


def _write(path: Path, rows, unbuildable, types, seconds: float, command: str) -> None:
    counts = {m: sum(o[i].startswith("ok") for *_, o in rows) for i, m in enumerate(METHODS)}
    errors = sum(o.startswith("error") for *_, outs in rows for o in outs)
    lines = [
        "# Architectures x methods",
        "",
        f"- Date: {datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}",
        f"- Command: `python {command}` (last run {seconds / 60:.1f} minutes)",
        f"- Model types mapped to a causal-LM class: {len(types)}; built tiny: {len(rows)}; "
        f"cannot be built tiny: {len(unbuildable)} (listed below); outcomes that are errors: {errors}",
        "- ok per method: " + ", ".join(f"{m} {n}/{len(rows)}" for m, n in counts.items()),
        "- Each model: random weights, hidden size 64, 2 layers, vocabulary 128, float32 (QuaRot: float64, the",
        "  rotated graph against the original, relative error <= 1e-6 because transformers' RMSNorms compute in",
        "  float32); calibration: 2 samples of 16 tokens. RTN W8 is ok only when every projection outside the",
        "  LM head is quantized (or named in a warning) and the logits are within 10 % (relative norm) of full precision.",
        "",
        "| architecture | class | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    lines += [f"| {t} | {cls} | " + " | ".join(_cell(o) for o in outs) + " |" for t, cls, outs in rows]
    lines += ["", "## Cannot be built tiny", "", "| architecture | reason |", "|---|---|"]
    lines += [f"| {t} | {_cell(r)} |" for t, r in unbuildable]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
