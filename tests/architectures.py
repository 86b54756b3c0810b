"""Every causal LM that transformers ships, built tiny, and what each qfx method does with it.

`tiny_model_of(model_type)` builds a random model from the architecture's default config with
its sizes shrunk (a few layers, hidden size 64, vocabulary 128); `run(model, method)` applies
one method and classifies the outcome:
- "ok": the method ran (for RTN W8 also: logits close to full precision, and every
  projection outside the LM head quantized or named in a warning saying why not: "ok (...)"
  quotes the warning);
- "refused: ...": qfx said why in one line (a user-facing error type);
- "error: ...": anything else, a bug.
The test suite runs capture + RTN W8 on every buildable architecture
(`tests/test_architectures.py`); `benchmarks/architectures.py` runs every method and writes
the table.
"""

from __future__ import annotations

import copy
import warnings

import torch
import transformers as T
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# sizes set on every config (and its text/decoder sub-config) that has the attribute
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
    d_model=64, ffn_dim=128, num_layers=2, n_heads=4, d_ff=128, encoder_layers=2, decoder_layers=2,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2, n_routed_experts=4,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, intermediate_size_mlp=128,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MAX_PARAMETERS = 5_000_000  # a config whose sizes live elsewhere stays large: not "tiny"
VOCAB = 128


class Unbuildable(Exception):
    """The architecture cannot be built tiny from its default config (the reason)."""


def model_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(cfg) -> None:
    for key, value in SMALL.items():
        if hasattr(cfg, key):
            try:
                setattr(cfg, key, value)
            except Exception:  # noqa: BLE001  (a read-only or validated attribute: keep the default)
                pass
    for sub in ("text_config", "decoder"):
        inner = getattr(cfg, sub, None)
        if hasattr(inner, "to_dict"):
            _shrink(inner)


def tiny_model_of(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A random tiny model of `model_type` that runs a forward pass, or Unbuildable(reason)."""
    try:
        cfg = CONFIG_MAPPING[model_type]()
        _shrink(cfg)
        with torch.device("meta"):
            n = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(cfg).parameters())
    except Exception as e:  # noqa: BLE001
        raise Unbuildable(f"config: {type(e).__name__}: {_line(e)}") from None
    if n > MAX_PARAMETERS:
        raise Unbuildable(f"{n / 1e6:.0f}M parameters after shrinking (its sizes live in a nested config)")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
            with torch.no_grad():
                model(input_ids=example_ids())
        except Exception as e:  # noqa: BLE001
            raise Unbuildable(f"transformers' own forward fails tiny: {type(e).__name__}: {_line(e)}") from None
    return model


def example_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _line(e: BaseException, width: int = 140) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= width else text[: width - 3] + "..."


METHODS = {  # table column -> recipe; calibrated ones get `calibration_ids()`
    "rtn w8": "rtn w8 g0",
    "gptq w4": "gptq w4 g32",
    "awq w4": "awq w4 g32",
    "smoothquant w8a8": "smoothquant w8 g0 a8",
    "quarot (float64, exact)": "quarot w4 g-1",  # prepared graph: rotations folded, nothing rounded yet
}


def calibration_ids() -> list[torch.Tensor]:
    return [example_ids(2, 16, seed=1)]


def user_errors() -> tuple[type[Exception], ...]:
    """The error types qfx raises for input it cannot handle (the CLI prints them as one line)."""
    from qfx.algorithms.gptq import HessianError
    from qfx.capture import CaptureError
    from qfx.config import ConfigError
    from qfx.observers import ObserverError
    from qfx.passes.fold_norms import RotationError
    from qfx.pipeline import QuantizeError

    return ConfigError, CaptureError, QuantizeError, RotationError, ObserverError, HessianError


def run(model: torch.nn.Module, method: str) -> str:
    """Apply `method` (a METHODS key) to `model`: "ok", "ok, ..." with a note, "refused: ...", or "error: ..."."""
    import qfx
    from qfx.coverage import projections

    recipe = METHODS[method]
    ids = example_ids()
    tolerance = 1e-6  # quarot: transformers' RMSNorms compute in float32 at any dtype
    if method.startswith("quarot"):
        model = copy.deepcopy(model).to(torch.float64)
        try:
            with torch.no_grad():
                model(input_ids=ids)
        except Exception:  # noqa: BLE001  (e.g. grouped expert matmuls have no float64 kernel)
            model, tolerance = model.to(torch.float32), 1e-4
    with torch.no_grad():
        fp = model(input_ids=ids).logits.double()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if method.startswith("quarot"):
                qmodel = qfx.prepare(model, recipe)
            else:
                qmodel = qfx.quantize(model, recipe, calib=calibration_ids(), progress=False)
            with torch.no_grad():
                out = qmodel(ids).double()
    except user_errors() as e:
        return f"refused: {_line(e)}"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {_line(e)}"
    notes = [_line(w.message, 100) for w in caught if "projection" in str(w.message)]
    found = projections(qmodel)
    missed = [p for p in found if p.status == "unrecognised"]
    rel = float((out - fp).norm() / fp.norm().clamp(min=1e-30))
    if method == "rtn w8" and (missed and not notes or rel > 0.1):  # silent, or wrong (an expert router may flip)
        return f"error: {len(missed)} unrecognised projections ({len(notes)} warnings), logits off by {rel:.2g}"
    if method.startswith("quarot") and rel > tolerance:
        return f"error: rotated model differs from the original by {rel:.2g} ({model.dtype})"
    if method.startswith("quarot") and tolerance > 1e-6:
        notes.append("checked in float32: transformers' float64 forward fails")
    if not torch.isfinite(out).all():
        return "error: non-finite logits"
    return "ok" + (f" ({'; '.join(notes)})" if notes else "")
