"""A checkpoint folder is written whole or not at all: everything goes to a temporary folder
beside the destination, renamed onto it only when complete (a run that fails leaves what the
user had). Shared by the native format (`qfx.io`) and the exporters (`qfx.formats`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, corrupt, or does not match its model."""


class atomic_dir:
    """Context manager: a temporary folder next to `path`, renamed to `path` on success."""

    def __init__(self, path, overwrite: bool):
        self.path = Path(path)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.path.exists() and not self.overwrite:
            raise CheckpointError(f"{self.path} exists; choose another output or allow overwriting")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self.umask = os.umask(0)
        os.umask(self.umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        # mkdtemp (and the safetensors writer) make private files; a checkpoint is not private
        os.chmod(self.tmp, 0o777 & ~self.umask)
        for f in self.tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~self.umask)
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
