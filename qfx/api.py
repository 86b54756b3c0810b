"""prepare / convert / quantize: the three ways of running a recipe, as lists of named steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm

from qfx.learn_rotations import learn_rotations
from qfx.calibrate import calibrate
from qfx.capture import capture
from qfx.config import TRANSFORM_METHODS, ConfigError, Recipe
from qfx.passes import counts
from qfx.passes.quantize_linears import quantize_linears
from qfx.pipeline import QuantizeError, with_observers

__all__ = ["QuantizeError", "convert", "needs_calibration", "prepare", "quantize"]


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
    return with_observers(gm, recipe, rotations=rotations)


def needs_calibration(prepared: GraphModule) -> bool:
    return counts(prepared).get("insert_observers", 0) > 0


def convert(prepared: GraphModule) -> GraphModule:
    """Replace planned linears with qfx ops holding packed weights (consumes observers)."""
    meta = prepared.meta.get("qfx", {})
    if "recipe" not in meta:
        raise QuantizeError("convert() takes the GraphModule returned by qfx.prepare()")
    recipe = Recipe.from_dict(meta["recipe"])
    block_wise = [m for m in recipe.methods if m in TRANSFORM_METHODS or m == "gptaq"]
    if block_wise and "solved" not in meta and counts(prepared).get("annotate_linears", 0):
        raise QuantizeError(f"{', '.join(block_wise)} calibrate block by block: run qfx.calibrate(prepared, batches) "
                            "before convert (a plain loop over prepared(batch) is enough only for rtn and gptq)")
    return quantize_linears(prepared)


def given_batches(calib, why: str) -> list[torch.Tensor]:
    """The calibration batches `calib` holds (or its function returns); `why` they are needed
    heads the error when there are none."""
    given = calib() if callable(calib) else calib
    batches = [] if given is None else list(given)
    if not batches:
        raise ConfigError(f"{why}: pass calib=")
    return batches


def quantize(
    model: torch.nn.Module,
    recipe: Recipe | str,
    calib: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] | None = None,
    example_inputs: tuple | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    timings: dict | None = None,
    on_rotations: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> GraphModule:
    """One call: (learn rotations,) prepare, calibrate block by block (when the recipe needs it), convert.

    calib: batches of token ids (B, S) (see `qfx.data.calibration_samples` for text), or a
        function returning them, called only when the recipe needs calibration data.
    device: where calibration runs; a model in CPU memory is calibrated there one block at
        a time (see `qfx.calibrate`).
    timings: a dict that receives `calib_seconds` (rotation learning and calibration) and
        `calib_samples` (rows of token ids seen).
    on_rotations: called with SpinQuant's learned rotations (e.g. to save them).
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    timings = {} if timings is None else timings
    timings.update(calib_seconds=0.0, calib_samples=0)
    batches: list[torch.Tensor] | None = None

    def calibration_batches(why: str) -> list[torch.Tensor]:
        nonlocal batches
        if batches is None:
            batches = given_batches(calib, why)
        timings["calib_samples"] = sum(int(b.shape[0]) for b in batches)
        return batches

    rotations = None
    if "spinquant" in recipe.methods and recipe.rotation_path is None:
        rows = [b[i:i + 1] for b in calibration_batches("spinquant learns its rotations from calibration data")
                for i in range(b.shape[0])]  # spin-batchN counts samples, not batches
        model = model.to(dtype) if dtype is not None else model
        start = time.time()
        rotations = learn_rotations(model, recipe, rows, recipe.spinquant.steps, recipe.spinquant.lr, progress,
                                    recipe.spinquant.batch)
        timings["calib_seconds"] += time.time() - start
        if on_rotations is not None:
            on_rotations(rotations)
    steps = tqdm(total=3, desc="quantize", unit="step", disable=not progress,
                 bar_format="{desc} ({n}/{total} steps, {elapsed})")
    steps.set_description_str("quantize: capture")
    gm = model if isinstance(model, GraphModule) else capture(model, example_inputs, dtype=dtype)
    steps.update()
    steps.set_description_str("quantize: plan and observe")
    prepared = prepare(gm, recipe, rotations=rotations)
    steps.update()
    if needs_calibration(prepared):
        steps.set_description_str("quantize: calibrate")
        data = calibration_batches("this recipe needs calibration data (static activation scales or GPTQ)")
        start = time.time()
        calibrate(prepared, data, progress=progress, device=device)
        timings["calib_seconds"] += time.time() - start
    steps.set_description_str("quantize: convert")
    qmodel = convert(prepared)
    steps.update()
    steps.close()
    return qmodel
