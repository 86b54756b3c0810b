"""prepare / convert / quantize: the three ways of running a recipe, as lists of named steps."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule

from qfx.algorithms.spinquant import learn_rotations
from qfx.calibrate import calibrate
from qfx.capture import capture, linear_nodes
from qfx.config import TRANSFORM_METHODS, ConfigError, Recipe
from qfx.passes import counts
from qfx.passes.annotate_linears import annotate_linears
from qfx.passes.canonicalize_linears import canonicalize_linears
from qfx.passes.insert_observers import insert_observers
from qfx.passes.quantize_kv import quantize_kv_cache
from qfx.passes.quantize_linears import quantize_linears
from qfx.passes.rotate import rotate_for_recipe


class QuantizeError(RuntimeError):
    """A model or input that the recipe cannot be applied to."""


def prepare(
    model: torch.nn.Module | GraphModule,
    recipe: Recipe | str,
    example_inputs: tuple | None = None,
    dtype: torch.dtype | None = None,
    rotations: dict[str, torch.Tensor] | None = None,
) -> GraphModule:
    """Capture `model` (unless it is a GraphModule already) and insert the recipe's observers.

    rotations: for quarot / spinquant, {"R1": ..., "R2.<o_proj path>": ...} to fold instead of
        random Hadamard ones (e.g. from `learn_rotations`).
    Returns a GraphModule computing the same function; run calibration batches through it
    (only needed when `needs_calibration(prepared)`), then `convert` it.
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    gm = model if isinstance(model, GraphModule) else capture(model, example_inputs, dtype=dtype)
    gm = canonicalize_linears(gm)
    if not linear_nodes(gm):
        raise QuantizeError(
            f"{gm.meta.get('qfx', {}).get('source', {}).get('class', type(model).__name__)} has no linear layers "
            "with parameter weights; qfx quantizes linear / Conv1D projections"
        )
    gm = rotate_for_recipe(gm, recipe, rotations=rotations)
    gm = quantize_kv_cache(gm, recipe.kv)
    gm = annotate_linears(gm, recipe)
    gm = insert_observers(gm, recipe)
    gm.meta["qfx"]["recipe"] = recipe.to_dict()
    return gm


def needs_calibration(prepared: GraphModule) -> bool:
    return counts(prepared).get("insert_observers", 0) > 0


def convert(prepared: GraphModule) -> GraphModule:
    """Replace planned linears with qfx ops holding packed weights (consumes observers)."""
    meta = prepared.meta.get("qfx", {})
    if "recipe" not in meta:
        raise QuantizeError("convert() takes the GraphModule returned by qfx.prepare()")
    recipe = Recipe.from_dict(meta["recipe"])
    block_wise = [m for m in recipe.methods if m in TRANSFORM_METHODS or m == "gptaq"]
    if block_wise and "solved" not in meta:
        raise QuantizeError(f"{', '.join(block_wise)} calibrate block by block: run qfx.calibrate(prepared, batches) "
                            "before convert (a plain loop over prepared(batch) is enough only for rtn and gptq)")
    return quantize_linears(prepared)


def quantize(
    model: torch.nn.Module,
    recipe: Recipe | str,
    calib: Iterable[torch.Tensor] | None = None,
    example_inputs: tuple | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> GraphModule:
    """One call: prepare, calibrate block by block (when the recipe needs it), convert.

    calib: batches of token ids (B, S) (see `qfx.data.calibration_samples` for text).
    device: where calibration runs; a model in CPU memory is calibrated there one block at
        a time (see `qfx.calibrate`).
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    calib = None if calib is None else list(calib)
    rotations = None
    if "spinquant" in recipe.methods and recipe.rotation_path is None:
        if not calib:
            raise ConfigError("spinquant learns its rotations from calibration data: pass calib=")
        model = model.to(dtype) if dtype is not None else model
        rotations = learn_rotations(model, recipe, calib, recipe.spin_steps, recipe.spin_lr, progress, recipe.spin_batch)
    prepared = prepare(model, recipe, example_inputs, dtype=dtype, rotations=rotations)
    if needs_calibration(prepared):
        if calib is None:
            raise ConfigError("this recipe needs calibration data (static activation scales or GPTQ): pass calib=")
        calibrate(prepared, calib, progress=progress, device=device)
    return convert(prepared)
