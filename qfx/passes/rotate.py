"""QuaRot-style rotations as exact rewrites of the graph.

Requires: a captured decoder with RMSNorms or pre-LayerNorms (`qfx.residual`), linears as aten.linear.
Guarantees, in float64 the logits are unchanged (tested: to 1e-10 relative for OPT, 1e-6 for
HF's RMSNorm models, whose norms compute in float32 whatever the model dtype):

- R1 (D x D) on the residual stream: norm weights folded into their readers (`fold_norms`),
  embedding tables E -> E R1, every linear writing into the stream W -> R1^T W (bias b R1),
  every linear reading a norm W -> W R1 (the LM head included);
- R2 (head_dim x head_dim) per attention block, between v and o: v's rows of each kv head
  -> R2^T W, o's input columns of each head -> W R2 (GQA heads share their kv head's R2);
- R4: an online `qfx.hadamard` op before every other linear that writes into the stream
  (down_proj, fc2), whose weight takes W H;
- R3: `qfx.hadamard` on the queries and keys entering each attention (after RoPE), so a
  quantized KV cache stores rotated keys; q k^T is unchanged.

R1 and R2 default to random-sign Hadamard matrices (`qfx.algorithms.hadamard.orthogonal`,
seeded by the recipe); `rotations` may give them instead ({"R1": (D, D), "R2.<o_proj path>":
(head_dim, head_dim)}, e.g. learned by SpinQuant). With `compute=False` only the graph
structure is rewritten (untied embeddings, online ops): what `qfx.load` needs before it fills
the tensors from a checkpoint. Tensors are rebound, never changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import qfx.ops  # noqa: F401  (registers torch.ops.qfx.hadamard)
from qfx.algorithms.hadamard import hadamard_dense, orthogonal
from qfx.graph import get_attr_tensor, module_path
from qfx.passes import finish
from qfx.passes.fold_norms import RotationError, fold_norm_weights, prepare_stream, rebind
from qfx.regions import ATTENTION, Region, find_regions
from qfx.residual import Stream

HADAMARD = torch.ops.qfx.hadamard.default


@dataclass
class RotationPlan:
    """The tensors each rotation rewrites, by get_attr target (read from the graph once)."""

    width: int  # D, the residual stream's width
    embeddings: list[str]  # tables (V, D): E R1
    writers: list[tuple[str, str | None]]  # (weight (D, K), bias (D,)): R1^T W, b R1
    readers: list[str]  # weights (N, D) reading a norm: W R1
    heads: list[Region]  # v -> o regions (fold.head_dim set): R2 per kv head
    online: list[str]  # weights (D, K) after an online Hadamard (R4): W H

    def r2_keys(self) -> list[str]:
        return [f"R2.{r.linears[0]}" for r in self.heads]

    def targets(self) -> list[str]:
        out = [*self.embeddings, *(t for wb in self.writers for t in wb if t), *self.readers]
        for r in self.heads:
            out += [*r.fold.targets, *r.weights]
        return list(dict.fromkeys(out))


def _bias_target(lin: Node) -> str | None:
    b = lin.args[2] if len(lin.args) > 2 else None
    return b.target if isinstance(b, Node) and b.op == "get_attr" else None


def plan_rotation(gm: GraphModule, stream: Stream) -> RotationPlan:
    regions = find_regions(gm, stream.writers)
    heads = [r for r in regions if r.fold is not None and r.fold.head_dim is not None]
    head_paths = {r.linears[0] for r in heads}
    online = [w.args[1].target for w in stream.writers if (module_path(w) or w.name) not in head_paths]
    return RotationPlan(
        width=stream.width,
        embeddings=[e.args[0].target for e in stream.embeddings],
        writers=[(w.args[1].target, _bias_target(w)) for w in stream.writers],
        readers=[r.args[1].target for n in stream.norms for r in n.readers],
        heads=heads,
        online=online,
    )


def rotated_tensors(tensors: dict[str, torch.Tensor], plan: RotationPlan, r1: torch.Tensor,
                    r2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New values of `plan.targets()` from `tensors` (norm weights already folded), as a pure
    function: differentiable in r1 and r2 (SpinQuant learns them through it).

    r1: (D, D) orthogonal. r2: {"R2.<o_proj path>": (head_dim, head_dim)} orthogonal.
    """
    out = dict(tensors)
    for t in plan.embeddings:
        out[t] = out[t] @ r1
    for w, b in plan.writers:
        out[w] = r1.T @ out[w]
        if b is not None:
            out[b] = out[b] @ r1
    for t in plan.readers:
        out[t] = out[t] @ r1
    for region, key in zip(plan.heads, plan.r2_keys()):
        q, hd = r2[key], region.fold.head_dim
        v_rows = sorted(set(region.fold.rows))
        for target in region.fold.targets:  # v's weight (N, K) then bias (N,): R2^T per kv head
            t = out[target]
            parts, last = [], 0
            for start in v_rows[::hd]:
                parts += [t[last:start], q.T @ t[start:start + hd]]
                last = start + hd
            out[target] = torch.cat(parts + [t[last:]])
        for target in region.weights:  # o's input columns, head by head: W R2
            w = out[target]
            out[target] = torch.cat([w[:, s:s + hd] @ q for s in range(0, w.shape[1], hd)], dim=1)
    return {t: out[t] for t in plan.targets()}


def _insert_hadamard(gm: GraphModule, consumer: Node, arg_index: int) -> Node:
    x = consumer.args[arg_index]
    with gm.graph.inserting_before(consumer):
        h = gm.graph.call_function(HADAMARD, (x,))
    h.meta = {k: v for k, v in consumer.meta.items() if k in ("nn_module_stack", "stack_trace")}
    h.meta["val"] = x.meta["val"]
    args = list(consumer.args)
    args[arg_index] = h  # just this argument: x may fill another one too
    consumer.args = tuple(args)
    return h


def rotate(gm: GraphModule, seed: int = 0, rotations: dict[str, torch.Tensor] | None = None,
           compute: bool = True) -> GraphModule:
    """Apply R1, R2, R3, R4 to `gm` (see the module docstring)."""
    rotations = rotations or {}
    stream = prepare_stream(gm, compute)
    plan = plan_rotation(gm, stream)
    if compute:
        unknown = set(rotations) - {"R1", *plan.r2_keys()}
        if unknown:
            raise RotationError(f"rotations for parts this model does not have: {sorted(unknown)[:3]}")
        fold_norm_weights(gm, stream)
        for target in plan.online:  # R4: x -> x H before the linear, so W -> W H
            w = get_attr_tensor(gm, target).detach().double()
            rebind(gm, target, w @ hadamard_dense(w.shape[1]).to(w.device))
        r1 = rotations.get("R1")
        r1 = orthogonal(plan.width, seed) if r1 is None else _checked(r1, plan.width, "R1")
        r2 = {}
        for i, (key, region) in enumerate(zip(plan.r2_keys(), plan.heads)):
            hd = region.fold.head_dim
            r2[key] = orthogonal(hd, seed + 1 + i) if key not in rotations else _checked(rotations[key], hd, key)
        device = get_attr_tensor(gm, plan.embeddings[0]).device
        tensors = {t: get_attr_tensor(gm, t).detach().to(device).double() for t in plan.targets()}
        new = rotated_tensors(tensors, plan, r1.to(device), {k: v.to(device) for k, v in r2.items()})
        for target, value in new.items():
            rebind(gm, target, value)
    online = set(plan.online)
    for lin in [w for w in stream.writers if w.args[1].target in online]:
        _insert_hadamard(gm, lin, 0)
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION]
    for attn in attentions:  # R3: queries and keys, after RoPE
        _insert_hadamard(gm, attn, 0)
        _insert_hadamard(gm, attn, 1)
    return finish(gm, "rotate", 1 + len(plan.heads) + len(online) + 2 * len(attentions))


def _checked(r: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if tuple(r.shape) != (n, n):
        raise RotationError(f"rotation {name} is {tuple(r.shape)}; this model needs ({n}, {n})")
    r = r.double()
    err = (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if err > 1e-4:
        raise RotationError(f"rotation {name} is not orthogonal (max |R R^T - I| = {err:.2e})")
    return r


def read_rotations(path: str) -> dict[str, torch.Tensor]:
    """Rotations saved as safetensors ({"R1": ..., "R2.<o_proj path>": ...})."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise RotationError(f"rotation file {path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for bad files
        raise RotationError(f"rotation file {path} is not a safetensors file of rotations: {e}") from None


def save_rotations(rotations: dict[str, torch.Tensor], path) -> None:
    """Write rotations as safetensors (to a temporary file renamed into place)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".rotations-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in rotations.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rotate_for_recipe(gm: GraphModule, recipe, compute: bool = True,
                      rotations: dict[str, torch.Tensor] | None = None) -> GraphModule:
    """`rotate` when the recipe's pipeline has a rotation method (see qfx.config.ROTATION_METHODS).

    Rotations come from `rotations`, else the recipe's rotation_path, else (quarot) random
    Hadamard matrices; spinquant needs learned ones (`qfx.learn_rotations`)."""
    from qfx.config import ROTATION_METHODS

    if not any(m in ROTATION_METHODS for m in recipe.methods):
        return gm
    if compute and rotations is None and recipe.rotation_path:
        rotations = read_rotations(recipe.rotation_path)
    if compute and rotations is None and "spinquant" in recipe.methods:
        raise RotationError("spinquant learns its rotations from calibration data: use qfx.quantize(model, recipe, "
                            "calib=...), or qfx.learn_rotations(...) and prepare(..., rotations=...)")
    return rotate(gm, recipe.rotation.seed, rotations, compute=compute)
