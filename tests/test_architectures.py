"""qfx on every causal LM transformers ships (built tiny): nothing unrecognised, nothing crashing.

The full table of methods x architectures is `benchmarks/results/architectures.md`
(`python benchmarks/architectures.py`); here, RTN W8 runs on every buildable architecture,
and every method on a handful chosen for their structure.
"""

import warnings

import pytest
import transformers

from tests.architectures import METHODS, Unbuildable, model_types, run, tiny_model_of


def test_rtn_w8_quantizes_every_projection_of_every_buildable_architecture():
    built, unbuildable, failed = [], {}, {}
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in model_types():
            try:
                model = tiny_model_of(model_type)
            except Unbuildable as e:
                unbuildable[model_type] = str(e)
                continue
            built.append(model_type)
            outcome = run(model, "rtn w8")
            if not outcome.startswith("ok"):
                failed[model_type] = outcome
    assert len(built) >= 100, f"only {len(built)} architectures built tiny: {unbuildable}"
    assert not failed, failed


# structure each one brings: plain pre-norm (llama), Conv1D (gpt2), LayerNorm + learned
# positions (opt), fused qkv (phi3), biases on q/k/v (qwen2), sandwich norms (gemma2),
# post-sublayer norms with q/k norms (olmo2), parallel attention and MLP (falcon). QuaRot
# refuses the last four here: norms after sublayers (gemma2, olmo2), an in-place residual add
# (falcon), and OPT's default config, whose embedding goes through a projection first
STRUCTURES = ["llama", "gpt2", "opt", "phi3", "qwen2", "gemma2", "olmo2", "falcon"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rtn w8"])
@pytest.mark.parametrize("model_type", STRUCTURES)
def test_every_method_runs_or_refuses_in_one_line(model_type, method):
    outcome = run(tiny_model_of(model_type), method)
    if method.startswith("quarot"):  # exact, or refused naming the node that stops it
        assert outcome == "ok" or outcome.startswith("refused: cannot rotate this model exactly"), outcome
        assert outcome == "ok" or model_type in ("gemma2", "olmo2", "opt", "falcon"), outcome
    else:
        assert outcome.startswith("ok"), outcome
