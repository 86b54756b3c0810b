"""The sequential calibration driver: block by block, each block fed the *quantized* outputs
of the blocks before it.

For each stage of the prepared graph (prefix, decoder blocks, suffix; `qfx.stages`):

1. transforms, in pipeline order: SmoothQuant or AWQ collect per-channel statistics over the
   stage's inputs, then fold scales into the regions of the block (`qfx.regions`); AWQ then
   clips the weights;
2. weights: a pass with the Hessian (GPTQ, GPTAQ) and static-range observers on, then
   `quantize_linears` on the stage, whose results are kept for `qfx.convert`;
3. the rewritten (quantized) stage runs once more to give the next stage its inputs.

Only the stage being worked on needs to be on `device`: a model left in CPU memory stays
there, each stage's weights are copied over while it is worked on, and its quantized weights
go back to the model's memory; activations between stages (a few GB even for 70B-class
models at 128 x 2048 tokens) stay on `device`. A graph captured without weights (on the meta
device) is calibrated with a `WeightStream`: each stage reads its tensors from disk when it
starts and hands them over, final, when it is done (`qfx.stream`).
Deterministic for given batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Protocol

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm

from qfx import distributed
from qfx.algorithms import awq, smoothquant
from qfx.graph import get_attr_tensor, retarget_devices, set_attr_tensor
from qfx.config import Recipe
from qfx.observers import AsymmetricHessianObserver, ChannelStatsObserver, HessianObserver, RangeObserver
from qfx.passes.annotate_linears import plans
from qfx.passes.quantize_linears import quantize_linears
from qfx.quantizer import fake_quantize_weight
from qfx.regions import Region, apply_scale, find_regions
from qfx.stages import Stage, split_stages

WEIGHT_OBSERVERS = (HessianObserver, RangeObserver)


class WeightStream(Protocol):
    """Where a graph without weights gets its tensors and where the finished ones go."""

    def load(self, target: str, like: torch.Tensor) -> torch.Tensor:
        """The values of the meta tensor `like` that the graph reads at `target` (CPU)."""

    def store(self, target: str, tensor: torch.Tensor, untouched: bool) -> None:
        """The final value at `target` (no later stage reads it); untouched: as `load` gave it."""


def calibrate(prepared: GraphModule, batches: Iterable[torch.Tensor], progress: bool = True,
              device: torch.device | str | None = None, weights: WeightStream | None = None) -> int:
    """Calibrate and choose the quantized weights of `prepared` block by block.

    batches: token ids (B, S) each. Larger B means fewer, larger passes over each block (the
        CLI's --calib-batch-size); the statistics are the same up to float rounding. AWQ's scale
        search runs on the first batches holding `recipe.awq.search_samples` samples. Under an
        initialised process group every process passes the same batches and runs its share
        of them; the statistics are merged and every process ends with the same tensors
        (`qfx.distributed`).
    device: where each stage runs (default: where the model is; give "cuda" for a model in CPU
        memory to calibrate it one block at a time on the GPU).
    weights: for a graph whose tensors are on the meta device: reads each stage's tensors
        and takes each final tensor after the last stage that reads it. Tensors of stages
        that calibration skips (e.g. a full-precision head) are neither read nor stored.
    Returns the number of calibration tokens. `qfx.convert(prepared)` then builds the model.
    """
    every_batch = list(batches)
    tokens = sum(b.numel() for b in every_batch)
    batches, first = distributed.my_batches(every_batch)  # under torchrun: this process's share
    if tokens == 0 and weights is None:  # a graph without weights is walked even with no data (RTN)
        raise ValueError("calibration got no batches; give at least one sample")
    recipe = Recipe.from_dict(prepared.meta["qfx"]["recipe"])
    home = torch.device("meta") if weights is not None else _device_of(prepared)
    device = torch.device(device) if device is not None else home
    if device.type == "meta":
        raise ValueError("a graph without weights (meta tensors) is calibrated with weights= and device=")
    stages = split_stages(prepared)
    regions = find_regions(prepared)
    solved = prepared.meta["qfx"].setdefault("solved", {})
    placeholder = next(n.name for n in prepared.graph.nodes if n.op == "placeholder")
    stream = [{placeholder: b.to(device)} for b in batches]
    fp_stream = [dict(e) for e in stream] if recipe.weight_method == "gptaq" else None
    last_use = _last_use(stages)
    last_reader = {n.target: i for i, s in enumerate(stages) for n in s.module.graph.nodes if n.op == "get_attr"}
    # AWQ's search runs on the leading samples of the whole set: this process's part of them
    n_search = min(max(_batches_holding(every_batch, recipe.awq.search_samples) - first, 0), len(batches))
    bar = tqdm(stages, desc="calibrate", unit="block", disable=not progress)
    with torch.no_grad():
        for i, stage in enumerate(bar):
            bar.set_postfix_str(stage.name)
            if not plans(stage.module) and not any(last_use.get(n, -1) > i for n in stage.outputs):
                continue  # e.g. the suffix when the head stays in full precision
            work = _StageRun(prepared, stage, recipe, device, home, n_search, weights,
                             {t for t, j in last_reader.items() if j > i})

            def advance(env: dict, out: tuple, stage: Stage = stage, i: int = i) -> None:
                _store(env, stage, out, last_use, i)

            if not work.planned:  # prefix: nothing to quantize, both streams alike
                work.run(stream, then=advance)
                if fp_stream is not None:
                    work.run(fp_stream, then=advance)
                work.finish()
                continue
            stage_regions = [r for r in regions if set(r.linears) <= work.linear_paths]
            for method in recipe.methods:
                if method == "smoothquant":
                    work.smoothquant(stream, stage_regions)
                elif method in ("awq", "awq+"):
                    work.awq(stream, stage_regions, asymmetric_clip=method == "awq+")
            work.weight_statistics(stream, fp_stream, advance_fp=advance)
            work.quantize(solved)
            work.free_statistics()  # consumed: freed before the last pass
            work.run(stream, then=advance)
            work.finish()
    return tokens


def _batches_holding(batches: list[torch.Tensor], samples: int) -> int:
    """How many leading batches it takes to hold `samples` samples (all of them if fewer)."""
    held = 0
    for i, b in enumerate(batches):
        held += b.shape[0] if b.dim() > 1 else 1
        if held >= samples:
            return i + 1
    return len(batches)


def _last_use(stages: list[Stage]) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, s in enumerate(stages):
        for name in s.inputs:
            last[name] = i
    return last


def _store(env: dict, stage: Stage, out: tuple, last_use: dict[str, int], i: int) -> None:
    """Add the stage's outputs to one batch's values; drop values no later stage reads.

    Called batch by batch as outputs are made, so a stage's inputs and outputs for the whole
    calibration set are never held at once (at 128 x 2048 tokens of an 8B model, 2 GB each).
    """
    env.update(zip(stage.outputs, out))
    for name in [n for n in env if last_use.get(n, -1) <= i]:
        del env[name]


class _StageRun:
    """One stage on the compute device: its planned linears, observers and passes over data."""

    def __init__(self, gm: GraphModule, stage: Stage, recipe: Recipe, device: torch.device, home: torch.device,
                 n_search: int, weights: WeightStream | None = None, read_later: set[str] = frozenset()):
        self.gm, self.stage, self.recipe, self.device, self.home = gm, stage, recipe, device, home
        self.n_search = n_search  # leading batches AWQ's scale search runs on
        self.weights, self.read_later = weights, read_later
        self.loaded: dict[str, torch.Tensor] = {}  # target -> the device tensor read from `weights`
        self.module = stage.module
        self.module.meta["qfx"] = {"recipe": gm.meta["qfx"]["recipe"]}
        self.planned = plans(self.module)
        if device != home:
            retarget_devices(self.module, device)
        self.linear_paths = {p.path for _, p in self.planned}
        for n in self.module.graph.nodes:  # a device copy of each tensor, on the stage only
            if n.op == "get_attr":
                t = get_attr_tensor(self.module, n.target)
                if isinstance(t, torch.Tensor) and t.is_meta:
                    set_attr_tensor(self.module, n.target, weights.load(n.target, t).to(device))
                    self.loaded[n.target] = get_attr_tensor(self.module, n.target)  # (a parameter holds it)
                elif isinstance(t, torch.Tensor) and t.device != device:
                    set_attr_tensor(self.module, n.target, t.to(device))
        self.observers = {}
        for n in self.module.graph.nodes:
            if n.op == "call_module":
                m = self.module.get_submodule(n.target)
                if hasattr(m, "enabled"):
                    self.observers[n.target] = m.to(device)
        self._enable(())

    # -- running ---------------------------------------------------------------------
    def _enable(self, kinds: tuple[type, ...]) -> None:
        for m in self.observers.values():
            m.enabled = isinstance(m, kinds)

    def _args(self, env: dict) -> list:
        return [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in (env[n] for n in self.stage.inputs)]

    def run(self, stream: list[dict], then=None) -> None:
        """One pass over the batches; `then(env, outputs)` right after each batch."""
        for env in stream:
            out = self.module(*self._args(env))
            if then is not None:
                then(env, tuple(out))

    # -- transforms ------------------------------------------------------------------
    def _channel_observer(self, path: str) -> ChannelStatsObserver:
        return self.module.get_submodule(f"{path}.channel_observer")

    def _plan(self, path: str):
        return next(p for _, p in self.planned if p.path == path)

    def _foldable(self, regions: list[Region], method: str) -> list[Region]:
        out = []
        for r in regions:
            if r.fold is None:
                warnings.warn(f"{method}: region {r.name} left as is: {r.reason}", stacklevel=4)
            else:
                out.append(r)
        return out

    def _collect_channels(self, stream, keep_limit: int | None = None) -> list[tuple]:
        for m in self.observers.values():
            if isinstance(m, ChannelStatsObserver):
                m.abs_max.zero_(), m.abs_sum.zero_()
                m.n_tokens, m.rows = 0, []
        self._enable((ChannelStatsObserver,))
        outs = []
        for j, env in enumerate(stream):
            out = self.module(*self._args(env))
            if keep_limit is not None and j < keep_limit:
                outs.append(out)
        self._enable(())
        self._sync((ChannelStatsObserver,))
        return outs

    def _sync(self, kinds: tuple[type, ...]) -> None:
        """Merge the statistics of every process (no-op in one process)."""
        for m in self.observers.values():
            if isinstance(m, kinds):
                m.sync()

    def smoothquant(self, stream: list[dict], regions: list[Region]) -> None:
        self._collect_channels(stream)
        for r in self._foldable(regions, "smoothquant"):
            obs = self._channel_observer(r.linears[0])
            weights = [get_attr_tensor(self.module, t) for t in r.weights]
            plan = self._plan(r.linears[0])
            if self.recipe.smoothquant.alpha is None:
                _, s = smoothquant.search_alpha(obs.abs_max, obs.sample(), weights, plan.weight, plan.act, r.tie)
            else:
                s = r.tie(smoothquant.smooth_scales(obs.abs_max, weights, self.recipe.smoothquant.alpha))
            apply_scale([self.module, self.gm], r, s)

    def awq(self, stream: list[dict], regions: list[Region], asymmetric_clip: bool) -> None:
        n_search = self.n_search
        targets = self._collect_channels(stream, keep_limit=n_search)
        applied: dict[str, torch.Tensor] = {}
        for r in self._foldable(regions, "awq"):
            mean = self._channel_observer(r.linears[0]).abs_mean()
            touched = list(r.fold.targets) + list(r.weights)
            saved = {t: get_attr_tensor(self.module, t) for t in touched}
            specs = [self._plan(p).weight for p in r.linears]

            def block_error(s: torch.Tensor, r=r, specs=specs, saved=saved) -> float:
                """Sum of the block's output MSE on the search samples with s folded into
                region r and its weights fake-quantized; the block's tensors restored after."""
                apply_scale([self.module], r, s)
                for t, spec in zip(r.weights, specs):
                    w = get_attr_tensor(self.module, t)
                    set_attr_tensor(self.module, t, fake_quantize_weight(w, spec).to(w.dtype))
                err = 0.0
                for env, ref in zip(stream[:n_search], targets):
                    out = self.module(*self._args(env))
                    err += sum(float((a.float() - b.float()).pow(2).mean()) for a, b in zip(out, ref)
                               if isinstance(a, torch.Tensor) and a.is_floating_point())
                for t, v in saved.items():
                    set_attr_tensor(self.module, t, v)
                return distributed.sum_float(err)

            best = awq.search_scale(mean, r.tie, block_error)
            apply_scale([self.module, self.gm], r, best)
            for p in r.linears:
                applied[p] = best
        for _, plan in self.planned:  # clip search on the (scaled) weights and inputs
            if plan.weight.dtype != "int":
                continue
            x = self._channel_observer(plan.path).sample().to(self.device)
            if plan.path in applied:
                x = x / applied[plan.path].to(x)
            w = get_attr_tensor(self.module, plan.weight_target)
            clipped = awq.clip_search(w, x, plan.weight, asymmetric=asymmetric_clip)
            for m in (self.module, self.gm):
                old = get_attr_tensor(m, plan.weight_target)
                set_attr_tensor(m, plan.weight_target, clipped.to(device=old.device, dtype=old.dtype))

    # -- weights ---------------------------------------------------------------------
    def weight_statistics(self, stream: list[dict], fp_stream: list[dict] | None, advance_fp=None) -> None:
        """Run the Hessian / range observers. With GPTAQ, each batch first goes through the
        full-precision stream (kept as GPTAQ's reference input), whose outputs `advance_fp`
        stores as that stream's next values."""
        if not any(isinstance(m, WEIGHT_OBSERVERS) for m in self.observers.values()):
            if fp_stream is not None:
                self.run(fp_stream, then=advance_fp)
            return
        self._enable(WEIGHT_OBSERVERS)
        asym = [m for m in self.observers.values() if isinstance(m, AsymmetricHessianObserver)]
        for j, env in enumerate(stream):
            if fp_stream is not None:
                for m in asym:
                    m.mode = "fp"
                advance_fp(fp_stream[j], tuple(self.module(*self._args(fp_stream[j]))))
                for m in asym:
                    m.mode = "q"
            self.module(*self._args(env))
        self._enable(())
        self._sync(WEIGHT_OBSERVERS)

    def quantize(self, solved: dict) -> None:
        """Rewrite the stage's linears to quantized ops; keep their tensors for convert."""
        quantize_linears(self.module)
        for _, plan in self.planned:
            tensors = {}
            for name in ("qweight", "w_scale", "w_zero", "a_scale"):
                try:
                    tensors[name] = get_attr_tensor(self.module, f"{plan.path}.{name}").to(self.home)
                except AttributeError:
                    pass
            solved[plan.path] = tensors

    def free_statistics(self) -> None:
        for m in self.observers.values():
            if hasattr(m, "release"):
                m.release()
            m.to("cpu")

    def finish(self) -> None:
        """Send the stage's tensors back to the model's memory: otherwise each finished block's
        device copies (its quantized weights: 0.1 GB per 8B-class block) stay referenced by its
        stage until calibration ends, and pile up on the device. The stage does not run again.
        With a `WeightStream`, the tensors no later stage reads are stored and released."""
        if self.device == self.home:
            return
        for n in self.module.graph.nodes:
            if n.op != "get_attr":
                continue
            t = get_attr_tensor(self.module, n.target)
            if not isinstance(t, torch.Tensor):
                continue
            if self.weights is not None:
                untouched = self.loaded.get(n.target) is t
                if n.target not in self.read_later:
                    self.weights.store(n.target, t, untouched)
                elif not untouched and n.target in self.loaded:
                    raise RuntimeError(f"cannot calibrate from disk: stage {self.stage.name} changed {n.target}, "
                                       "which a later stage reads too")
            if t.device != self.home:
                set_attr_tensor(self.module, n.target, t.to(self.home))
        self.loaded.clear()


def _device_of(gm: torch.nn.Module) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")
