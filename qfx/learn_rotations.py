"""SpinQuant: learn the rotations R1 (D x D) and R2 (one head_dim x head_dim per attention)
on calibration data, then fold them as QuaRot does (`qfx.passes.rotate`).

The model is captured, its norms folded and its online Hadamards (R3, R4) inserted, as for
QuaRot with identity R1/R2. Each step then:
1. rebuilds the rotated weights from R1 and R2 (`rotated_tensors`, differentiable);
2. runs the graph with every planned linear's input quantized per token (and its weight by
   RTN when RTN chooses the final weights; a pipeline whose GPTQ-like method chooses them
   later learns with full-precision weights, as in the paper), and the KV cache quantized if
   the recipe says so. Gradients pass straight through the rounding and, as LSQ's estimator
   does, also flow into each token's scale, and from it into the token's largest |x|: the
   only path by which the loss sees that a rotation narrows or widens a token's range. (The
   paper's estimator holds the scale constant; on SmolLM2 W4A4 it let the loss rise under
   learning: benchmarks/results/rotation_smollm2.md);
3. takes the next-token cross-entropy and moves R1 and each R2 along the orthogonal group
   by a Cayley step: A = G R^T - R G^T (skew), R <- (I + a/2 A)^-1 (I - a/2 A) R with
   a = min(lr, 1 / ||A||_1), which stays exactly orthogonal. The step size is constant: the
   paper's linear decay made SpinQuant+GPTQ worse on SmolLM2 (same results file).
R1 and R2 start from QuaRot's random Hadamard matrices.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Interpreter
from tqdm.auto import tqdm

from qfx.algorithms.hadamard import orthogonal
from qfx.algorithms.spinquant import LsqActivation, cayley_step, straight_through
from qfx.capture import capture
from qfx.config import Recipe
from qfx.graph import get_attr_tensor
from qfx.passes.annotate_linears import plans
from qfx.passes.canonicalize_linears import canonicalize_linears
from qfx.passes.fold_norms import checked_stream
from qfx.passes.rotate import plan_rotation, rotated_tensors
from qfx.pipeline import lay_out
from qfx.quantizer import fake_quantize_activation, fake_quantize_weight


class _FakeQuantRun(Interpreter):
    """Runs the graph with `params` in place of its tensors and planned linears fake-quantized."""

    def __init__(self, gm: GraphModule, params: dict[str, torch.Tensor], quantize_weights: bool):
        super().__init__(gm)
        self.params, self.quantize_weights = params, quantize_weights
        self.planned = dict(plans(gm))

    def get_attr(self, target, args, kwargs):
        return self.params[target] if target in self.params else super().get_attr(target, args, kwargs)

    def run_node(self, n):
        plan = self.planned.get(n)
        if plan is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
        xf, wf = x.float(), w.float()
        if plan.act is not None and plan.act.dynamic and plan.act.dtype != "fp8":
            xf = LsqActivation.apply(x, plan.act.bits, plan.act.clip_ratio)
        elif plan.act is not None:
            xf = straight_through(xf, fake_quantize_activation(xf.detach(), plan.act))
        if self.quantize_weights and plan.weight is not None:
            wf = straight_through(wf, fake_quantize_weight(wf.detach(), plan.weight))
        return torch.nn.functional.linear(xf, wf, None if b is None else b.float()).to(x.dtype)


def learn_rotations(model: torch.nn.Module, recipe: Recipe | str, batches, steps: int = 100,
                    lr: float = 1.5, progress: bool = True, batches_per_step: int = 1) -> dict[str, torch.Tensor]:
    """Rotations {"R1": (D, D), "R2.<o_proj path>": (hd, hd)} (float32, CPU) learned on `batches`
    (token ids (B, S) each, cycled) for `steps` Cayley steps of size at most `lr`; each step
    averages the gradients of `batches_per_step` consecutive batches (one backward pass each,
    so memory does not grow with it)."""
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    batches = list(batches)
    if not batches:
        raise ValueError("learn_rotations: give at least one calibration batch")
    gm = canonicalize_linears(capture(model))
    stream = checked_stream(gm)
    plan = plan_rotation(gm, stream)
    identity = {"R1": torch.eye(plan.width, dtype=torch.float64)}
    identity.update({k: torch.eye(r.fold.head_dim, dtype=torch.float64) for k, r in zip(plan.r2_keys(), plan.heads)})
    gm = lay_out(gm, recipe, rotations=identity)  # norms folded, R4 folded and online, R3 online
    stream = checked_stream(gm)
    plan = plan_rotation(gm, stream)  # same targets, read from the rewritten graph
    device = get_attr_tensor(gm, plan.embeddings[0]).device
    base = {t: get_attr_tensor(gm, t).detach().float() for t in plan.targets()}
    dtypes = {t: get_attr_tensor(gm, t).dtype for t in plan.targets()}
    r1 = orthogonal(plan.width, recipe.rotation.seed).float().to(device)
    r2 = {k: orthogonal(r.fold.head_dim, recipe.rotation.seed + 1 + i).float().to(device)
          for i, (k, r) in enumerate(zip(plan.r2_keys(), plan.heads))}
    quantize_weights = recipe.weight_method == "rtn"  # otherwise GPTQ-like methods choose them after
    bar = tqdm(range(steps), desc="spinquant", unit="step", disable=not progress)
    if batches_per_step < 1:
        raise ValueError(f"learn_rotations: batches_per_step={batches_per_step} must be >= 1")
    for step in bar:
        leaves = [r1.requires_grad_(), *(v.requires_grad_() for v in r2.values())]
        grads, loss_sum = [torch.zeros_like(v) for v in leaves], 0.0
        for j in range(batches_per_step):
            ids = batches[(step * batches_per_step + j) % len(batches)].to(device)
            rotated = rotated_tensors(base, plan, r1, r2)
            params = {t: v.to(dtypes[t]) for t, v in rotated.items()}
            out = _FakeQuantRun(gm, params, quantize_weights).run(ids)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            for g, d in zip(grads, torch.autograd.grad(loss / batches_per_step, leaves)):
                g += d
            loss_sum += loss.item()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"spinquant: loss is {loss.item()} at step {step}; lower the learning rate")
        with torch.no_grad():
            r1 = cayley_step(r1.detach(), grads[0], lr)
            r2 = {k: cayley_step(v.detach(), g, lr) for (k, v), g in zip(r2.items(), grads[1:])}
        bar.set_postfix(loss=f"{loss_sum / batches_per_step:.3f}")
    return {"R1": r1.detach().cpu(), **{k: v.detach().cpu() for k, v in r2.items()}}
