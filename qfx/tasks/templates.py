"""Each task's documents as log-likelihood requests, written as lm-evaluation-harness writes
them, so that accuracies compare with published tables.

A document becomes an `Item`: one (context, continuation) request per choice, the gold
index, and the choice texts whose character lengths `acc_norm` divides by. The continuation
is joined to the context with the harness's target delimiter " ".
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int
    choices: tuple[str, ...]  # what acc_norm measures the length of (characters)


# metrics each task reports, as the harness does
METRICS = {
    "piqa": ("acc", "acc_norm"),
    "boolq": ("acc",),
    "winogrande": ("acc",),
    "hellaswag": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "lambada": ("acc", "perplexity"),
}


def _choices(context: str, choices: list[str], gold: int) -> Item:
    return Item(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def piqa(doc: dict) -> Item:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def boolq(doc: dict) -> Item:
    gold = 1 if str(doc["answer"]).lower() == "true" else 0
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], gold)


def winogrande(doc: dict) -> Item:
    """Partial scoring: each option fills the blank; the request scores the rest of the sentence."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1:].strip()
    options = [doc["option1"], doc["option2"]]
    return Item(tuple((sentence[:blank] + o, rest) for o in options), int(doc["answer"]) - 1, (rest, rest))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> Item:
    endings = doc["endings"]
    if isinstance(endings, str):  # stored as the text of a Python list in some copies
        import ast

        endings = ast.literal_eval(endings)
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _choices(context, [_hellaswag_clean(e) for e in endings], int(doc["label"]))


def arc(doc: dict) -> Item:
    return _choices(doc["query"], list(doc["choices"]), int(doc["gold"]))


def lambada(doc: dict) -> Item:
    return Item(((doc["context"], " " + doc["continuation"]),), 0, (doc["continuation"],))


ITEMS = {"piqa": piqa, "boolq": boolq, "winogrande": winogrande, "hellaswag": hellaswag, "arc_easy": arc,
         "arc_challenge": arc, "lambada": lambada}
TASKS = tuple(ITEMS)
