"""Quantize a Hugging Face folder larger than the host's memory: weights read from disk block by
block, the result written block by block.

    folder (config.json + safetensors shards)
      ──build on the meta device (buffers real)──▶ capture ──▶ prepare        (no weight in memory)
      ──calibrate(weights=FolderStream): stage i reads its tensors from the shards, is
        calibrated and quantized on `device`, and each final tensor goes to the output's
        shards as soon as no later stage reads it
      ──tensors calibration skipped (e.g. a full-precision head) copied through
      ──qfx.json, tokenizer; the folder renamed into place          (what qfx.load reads)

The result is the native format (`qfx.io`), the same tensors bit for bit as quantizing the
model in memory and saving it. Recipes that rotate (quarot, spinquant) fold rotations into
every weight before calibration starts, so they need the whole model in memory and are refused.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.fx import GraphModule

from qfx import distributed
from qfx.api import given_batches, needs_calibration, prepare
from qfx.calibrate import calibrate
from qfx.capture import capture
from qfx.checkpoint_folder import CheckpointError, atomic_dir
from qfx.config import ConfigError, Recipe
from qfx.graph import get_attr_tensor
from qfx.io import META_FILE, checkpoint_meta, tensor_targets
from qfx.passes.quantize_linears import quantize_linears
from qfx.weight_files import ShardWriter, WeightFiles

WHOLE_MODEL_METHODS = ("quarot", "spinquant")


def quantize_streaming(
    folder: str | os.PathLike,
    recipe: Recipe | str,
    output: str | os.PathLike,
    calib: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    tokenizer=None,
    overwrite: bool = False,
    timings: dict | None = None,
) -> Path:
    """Quantize the model in HF `folder` into the qfx folder `output`, one block in memory at a time.

    calib: batches of token ids (B, S), or a function returning them (as `qfx.quantize`).
    device: where each block is calibrated. dtype: the model's dtype (weights are cast as read).
    tokenizer: saved into the output when given. overwrite: replace an existing `output`.
    timings: a dict that receives `calib_seconds` and `calib_samples` (as `qfx.quantize`'s).
    Returns the output path; `qfx.load(output)` gives the quantized model.
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    whole = [m for m in recipe.methods if m in WHOLE_MODEL_METHODS]
    if whole:
        raise ConfigError(f"{whole[0]} folds rotations into every weight before calibration, so it needs the whole "
                          "model in memory: quantize without streaming")
    weights = WeightFiles(folder)
    model = empty_hf_model(folder, dtype)
    prepared = prepare(capture(model), recipe)
    # the converted graph's structure (tensors on the meta device): the output's names, shapes, dtypes
    layout = quantize_linears(copy.deepcopy(prepared), allocate_only=True)
    stream = FolderStream(weights, tied_names(model), layout)
    batches: list[torch.Tensor] = []
    if needs_calibration(prepared):
        batches = given_batches(calib, "this recipe needs calibration data (static activation scales or GPTQ)")
    timings = {} if timings is None else timings
    start = time.time()
    if distributed.rank() != 0:  # under torchrun every process calibrates and the first one writes
        stream.writer = _Discard(output)
        calibrate(prepared, batches, progress=progress, device=device, weights=stream)
        return Path(output)
    with atomic_dir(output, overwrite) as tmp:
        stream.writer = ShardWriter(tmp)
        # with no data (round to nearest) each block is still read, quantized and written in turn
        calibrate(prepared, batches, progress=progress, device=device, weights=stream)
        timings.update(calib_seconds=time.time() - start, calib_samples=sum(int(b.shape[0]) for b in batches))
        stream.copy_rest(prepared)
        stream.writer.close()
        meta = checkpoint_meta(layout, stream.aliases)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(output)


def empty_hf_model(folder: str | os.PathLike, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of `folder`'s config.json with its parameters on the meta device (nothing
    allocated) and its buffers (rotary tables) computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read the model config ({str(e).splitlines()[0]})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config ties real weights but not meta ones
    return model.eval()


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each parameter name -> every name of the same parameter (tied weights are stored under one)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


class FolderStream:
    """`qfx.calibrate.WeightStream` over a folder's shards, writing to `writer` (set before use).

    layout: the converted graph's structure; every tensor stored is checked against it.
    """

    def __init__(self, weights: WeightFiles, tied: dict[str, list[str]], layout: GraphModule):
        self.weights, self.tied = weights, tied
        self.expected = {t: get_attr_tensor(layout, t) for t in tensor_targets(layout)}
        self.writer: ShardWriter | None = None
        self.aliases: dict[str, str] = {}  # target -> the target stored with the same tensor
        self.untouched: dict[str, str] = {}  # checkpoint name -> target stored with its values as read

    def _source_name(self, target: str) -> str:
        for name in self.tied.get(target, [target]):
            if name in self.weights:
                return name
        raise CheckpointError(f"{self.weights.folder}: no tensor {target!r} (nor a tied name of it) in the "
                              "safetensors shards; a folder whose tensor names differ from the model's loads with "
                              "transformers, and save_pretrained writes it with the model's names")

    def load(self, target: str, like: torch.Tensor) -> torch.Tensor:
        t = self.weights.tensor(self._source_name(target))
        if tuple(t.shape) != tuple(like.shape):
            raise CheckpointError(f"{self.weights.folder}: tensor {target!r} is {tuple(t.shape)}, the model's "
                                  f"config makes it {tuple(like.shape)}")
        return t.to(like.dtype)

    def store(self, target: str, tensor: torch.Tensor, untouched: bool) -> None:
        want = self.expected.get(target)
        if want is None:
            raise CheckpointError(f"calibration produced {target!r}, which the quantized model does not read")
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise CheckpointError(f"{target!r} came out {tuple(tensor.shape)} {tensor.dtype}, the quantized model "
                                  f"reads {tuple(want.shape)} {want.dtype}")
        if untouched:  # a tied weight as read from disk: stored once, as save() stores tied weights
            source = self._source_name(target)
            if source in self.untouched:
                self.aliases[target] = self.untouched[source]
                return
            self.untouched[source] = target
        self.writer.add(target, tensor)

    def copy_rest(self, prepared: GraphModule) -> None:
        """Store the output tensors no stage stored: those of stages calibration skipped."""
        for target, want in self.expected.items():
            if target in self.writer or target in self.aliases:
                continue
            try:
                t = get_attr_tensor(prepared, target)
            except AttributeError:
                raise CheckpointError(f"the quantized model reads {target!r}, which calibration did not produce") \
                    from None
            self.store(target, self.load(target, want) if t.is_meta else t, untouched=t.is_meta)


class _Discard(ShardWriter):
    """A writer that keeps names only: the processes of a torchrun group other than the first."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self:
            raise CheckpointError(f"tensor {name!r} written twice")
        self.weight_map[name] = ""  # nothing held or copied off the device
