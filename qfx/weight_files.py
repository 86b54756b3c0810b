"""Safetensors shards read one tensor at a time and written as tensors arrive.

`WeightFiles` reads a folder holding `model.safetensors` or shards listed in
`model.safetensors.index.json` (what `save_pretrained` writes): a tensor is read only when
asked for, so a model larger than the host's memory can be read
block by block. `ShardWriter` fills a folder's shards in the order tensors come, starting a
new shard past a size, and writes the index at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qfx.checkpoint_folder import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 2**29  # a shard's size, and what a streamed run holds of its output at most


class WeightFiles:
    """The tensors of a folder's safetensors files, by name, read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such folder")
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e})") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shards that are not in the folder: {', '.join(missing[:3])}"
                                      f"{' ...' if len(missing) > 3 else ''}")
            self.shard_of = dict(weight_map)
        elif (self.folder / SINGLE_FILE).is_file():
            with self._open(SINGLE_FILE) as f:
                self.shard_of = {name: SINGLE_FILE for name in f.keys()}
        else:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            if bins:
                raise CheckpointError(
                    f"{self.folder} holds only PyTorch .bin weights ({bins[0]}), which cannot be read tensor by "
                    "tensor without unpickling; convert it once with transformers: AutoModelForCausalLM."
                    "from_pretrained(folder).save_pretrained(new_folder) writes safetensors shards")
            raise CheckpointError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, shard: str):
        """The shard's reader. Opened for each read and closed after it: an open reader keeps the
        file mapped, and every page read through it would stay in this process's resident memory
        (a whole model's worth by the end of a streamed run)."""
        try:
            return safe_open(str(self.folder / shard), framework="pt")
        except Exception as e:
            raise CheckpointError(f"{self.folder / shard}: cannot read safetensors ({e})") from None

    def names(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor stored under `name`, read into memory (CPU)."""
        if name not in self.shard_of:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        with self._open(self.shard_of[name]) as f:
            return f.get_tensor(name)


class ShardWriter:
    """Writes tensors into `folder` as `model-00001.safetensors`, ... and `model.safetensors.index.json`.

    Tensors are held until the next would take their shard past `shard_bytes`, then written and
    released: at most one shard's worth is in memory. `close` writes the last shard and the index.
    """

    def __init__(self, folder: str | Path, shard_bytes: int | None = None, metadata: dict | None = None):
        self.folder = Path(folder)
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self.metadata = metadata or {}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.shards = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self.pending

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self:
            raise CheckpointError(f"tensor {name!r} written twice")
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self.pending_bytes + size > self.shard_bytes:  # a shard holds at most shard_bytes (or one larger tensor)
            self._flush()
        self.pending[name] = t
        self.pending_bytes += size

    def _flush(self) -> None:
        if not self.pending:
            return
        self.shards += 1
        shard = f"model-{self.shards:05d}.safetensors"
        save_file(self.pending, str(self.folder / shard), metadata=self.metadata)
        for name in self.pending:
            self.weight_map[name] = shard
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=1))
