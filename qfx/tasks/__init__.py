"""Zero-shot task accuracy (PIQA, BoolQ, WinoGrande, HellaSwag, ARC-Easy/Challenge, LAMBADA),
scored as lm-evaluation-harness scores them: `evaluate_tasks(model, tokenizer, tasks)`."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch

from qfx.tasks.data import TaskDataError, check_installed, documents
from qfx.tasks.scoring import encode, loglikelihoods
from qfx.tasks.templates import ITEMS, METRICS, TASKS

__all__ = ["TASKS", "TaskDataError", "check_tasks", "evaluate", "evaluate_tasks"]


def check_tasks(tasks: list[str]) -> None:
    """Unknown names and data that is not installed, before anything is loaded."""
    unknown = [t for t in tasks if t not in ITEMS]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))}: choose from {', '.join(TASKS)}")
    check_installed([t for t in tasks if t != "lambada"])


def evaluate(model, tokenizer, tasks: list[str] | tuple[str, ...] = TASKS, **options) -> dict[str, dict[str, float]]:
    """`evaluate_tasks` for any causal LM: a qfx graph, or a Hugging Face model (its `.logits`)."""

    def logits(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        return out.logits if hasattr(out, "logits") else out

    return evaluate_tasks(logits, tokenizer, list(tasks), **options)


def evaluate_tasks(model: Callable[[torch.Tensor], torch.Tensor], tokenizer, tasks: list[str],
                   limit: int | None = None, batch_size: int = 16, max_length: int = 2048,
                   device: str | torch.device = "cpu", lambada_file: str | None = None,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value, "n": documents}} for each task.

    model: input_ids (B, S) -> logits (B, S, V). limit: the first `limit` documents of each
    task. acc: the choice with the highest log-likelihood is the gold one; acc_norm: the same
    with each log-likelihood divided by its choice's length in characters; LAMBADA acc: greedy
    decoding gives the whole target word, perplexity: exp(-mean log-likelihood of the target
    word). Standard errors of the accuracies: sample standard deviation / sqrt(n).
    """
    check_tasks(tasks)
    out = {}
    for task in tasks:
        items, requests, encoded = _requests(task, limit, lambada_file, tokenizer)
        scores = loglikelihoods(model, tokenizer, requests, batch_size, max_length, device, progress, task, encoded)
        out[task] = _metrics(task, items, scores)
    return out


@functools.lru_cache(maxsize=16)
def _requests(task: str, limit: int | None, lambada_file: str | None, tokenizer):
    """(documents as items, their requests, the requests' tokens): read and tokenized once per
    tokenizer, since comparing models evaluates the same requests again and again."""
    items = [ITEMS[task](d) for d in itertools.islice(documents(task, lambada_file), limit)]
    requests = [r for item in items for r in item.requests]
    return items, requests, [encode(tokenizer, c, x) for c, x in requests]


def _metrics(task: str, items, scores) -> dict[str, float]:
    per_doc: dict[str, list[float]] = {m: [] for m in METRICS[task]}
    at = 0
    for item in items:
        mine = scores[at: at + len(item.requests)]
        at += len(item.requests)
        lls = [ll for ll, _ in mine]
        if task == "lambada":
            per_doc["acc"].append(float(mine[0][1]))
            per_doc["perplexity"].append(lls[0])
            continue
        per_doc["acc"].append(float(max(range(len(lls)), key=lls.__getitem__) == item.gold))
        if "acc_norm" in per_doc:
            normed = [ll / max(len(c), 1) for ll, c in zip(lls, item.choices)]
            per_doc["acc_norm"].append(float(max(range(len(normed)), key=normed.__getitem__) == item.gold))
    result: dict[str, float] = {"n": len(items)}
    for metric, values in per_doc.items():
        if metric == "perplexity":
            result[metric] = math.exp(-sum(values) / len(values))
            continue
        mean = sum(values) / len(values)
        result[metric] = mean
        var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
        result[f"{metric}_stderr"] = math.sqrt(var / len(values))
    return result
