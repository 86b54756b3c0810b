"""qfx on every causal LM transformers ships (built tiny): nothing unrecognised, nothing crashing.

The full table of methods x architectures is `benchmarks/results/architectures.md`
(`python benchmarks/architectures.py`); here, RTN W8 runs on every buildable architecture,
and every method on a handful chosen for their structure.
"""

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor

import pytest
import transformers

from tests.architectures import METHODS, Unbuildable, model_types, run, tiny_model_of


def _rtn_w8(model_type: str) -> tuple[str, str]:
    """("unbuildable" | outcome, detail) for one architecture; runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tiny_model_of(model_type)
        except Unbuildable as e:
            return "unbuildable", str(e)
        return run(model, "rtn w8"), ""


def test_rtn_w8_quantizes_every_projection_of_every_buildable_architecture():
    # one process per core: each architecture is independent, and capture is single-threaded work
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = dict(zip(model_types(), pool.map(_rtn_w8, model_types())))
    unbuildable = {t: d for t, (o, d) in outcomes.items() if o == "unbuildable"}
    built = {t: o for t, (o, _) in outcomes.items() if o != "unbuildable"}
    assert len(built) >= 100, f"only {len(built)} architectures built tiny: {unbuildable}"
    failed = {t: o for t, o in built.items() if not o.startswith(("ok", "refused: could not capture"))}
    assert not failed, failed  # a model torch.export cannot capture is refused in one line, naming it
    assert sum(o.startswith("ok") for o in built.values()) >= 0.95 * len(built)


# structure each one brings: plain pre-norm (llama), Conv1D (gpt2), LayerNorm + learned
# positions (opt), fused qkv (phi3), biases on q/k/v (qwen2), sandwich norms (gemma2),
# post-sublayer norms with q/k norms (olmo2). QuaRot refuses three here: norms after sublayers
# (gemma2, olmo2) and OPT's default config, whose embedding goes through a projection first
STRUCTURES = ["llama", "gpt2", "opt", "phi3", "qwen2", "gemma2", "olmo2"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rtn w8"])
@pytest.mark.parametrize("model_type", STRUCTURES)
def test_every_method_runs_or_refuses_in_one_line(model_type, method):
    outcome = run(tiny_model_of(model_type), method)
    if method.startswith("quarot"):  # exact, or refused naming the node that stops it
        assert outcome == "ok" or outcome.startswith("refused: cannot rotate this model exactly"), outcome
        assert outcome == "ok" or model_type in ("gemma2", "olmo2", "opt"), outcome
    else:
        assert outcome.startswith("ok"), outcome


def test_quarot_unties_an_embedding_that_a_head_reads_behind_a_norm_of_its_own():
    # XLM-RoBERTa-XL's decoder shares the word embedding but reads lm_head.layer_norm, not the
    # stream: centring and rotating the embedding must not reach the decoder's weight
    assert run(tiny_model_of("xlm-roberta-xl"), "quarot (float64, exact)") == "ok"
