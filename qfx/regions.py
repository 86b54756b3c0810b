"""Regions: groups of linears that read the same input, and the op producing that input into
which a per-channel scale can be folded exactly. Read from data flow alone.

A scale s (K,) on a region's input channels is an equivalence transform when the producer's
output can be divided by s and every linear of the region multiplied by s along its input:

- a norm's elementwise weight (RMSNorm `w * x_hat`, Gemma's `(1 + w) * x_hat`, LayerNorm's
  weight and bias): divide the parameter (and bias) by s;
- rows of a linear whose output reaches the region through ops that commute with a positive
  per-channel scale: `up * act(gate)` (and the up half of a fused gate_up), `relu(fc1)`, and
  attention's value path (`softmax(q k^T) v` is linear in v), with GQA: query head h reads
  kv head h // (H / KVH), so o_proj's input channel (h, j) takes v's row (h // rep, j) and
  the scales of the heads sharing a kv head are tied.

Anything else (a residual add, GELU of a linear, a norm output also read elsewhere) gives a
region with `fold = None` and the reason. Layout assumptions on the attention path (heads
along the last dim as (H, head_dim), kv heads repeated as a block) are those of HF's
attention; the float64 exactness tests check them for each architecture family.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qfx.graph import get_attr_tensor, LINEAR_TARGETS, module_path, set_attr_tensor

aten = torch.ops.aten
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default, aten.clone.default,
         aten.contiguous.default, aten.alias.default}
HEAD_LAYOUT = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.unsqueeze.default,
               aten.expand.default, aten._unsafe_view.default, aten.permute.default}
ATTENTION = {aten.scaled_dot_product_attention.default}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class Fold:
    """Where a region's input scale goes: divide `targets` (along `rows` of a linear's weight
    and bias, or the whole norm parameter) by the scale."""

    kind: str  # "norm" (parameter (K,), plus an optional bias) or "rows" (a producer linear)
    targets: tuple[str, ...]  # get_attr targets: norm weight [, bias] or linear weight [, bias]
    offset: float = 0.0  # norm parameterised as (offset + w)
    rows: tuple[int, ...] | None = None  # kind "rows": producer row of each region channel
    head_dim: int | None = None  # set when the region is attention's value path (v -> o)


@dataclass(frozen=True)
class Region:
    producer: str  # module path (or node name) of the op producing the input
    linears: tuple[str, ...]  # module paths of the consumers
    weights: tuple[str, ...]  # their weight targets
    channels: int
    fold: Fold | None
    reason: str = ""  # why fold is None

    @property
    def name(self) -> str:
        return f"{self.producer} -> {', '.join(p.rsplit('.', 1)[-1] for p in self.linears)}"

    def tie(self, s: torch.Tensor) -> torch.Tensor:
        """A scale (K,) made foldable: channels sharing a producer row get their mean."""
        if self.fold is None or self.fold.rows is None:
            return s
        rows = torch.tensor(self.fold.rows, device=s.device)
        uniq, inv = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=s.dtype, device=s.device).index_add_(0, inv, s)
        counts = torch.zeros(len(uniq), dtype=s.dtype, device=s.device).index_add_(0, inv, torch.ones_like(s))
        return (sums / counts)[inv]


def _users(n: Node) -> list[Node]:
    return [u for u in n.users if u.target is not aten._assert_tensor_metadata.default]


def _skip_observers(gm: GraphModule, x: Node) -> Node:
    while isinstance(x, Node) and x.op == "call_module" and not isinstance(gm.get_submodule(x.target), GraphModule):
        x = x.args[0]
    return x


def _keeps_channels(n: Node) -> bool:
    """A cast, or a reshape that leaves the last dim (the channels) alone, e.g. GPT-2's
    (B, S, K) <-> (B * S, K) around its Conv1D matmuls."""
    if n.op != "call_function":
        return False
    if n.target in CASTS:
        return True
    return n.target in RESHAPES and isinstance(n.args[0], Node) \
        and n.meta["val"].shape[-1] == n.args[0].meta["val"].shape[-1]


def _through_casts(n):
    while isinstance(n, Node) and _keeps_channels(n):
        n = n.args[0]
    return n


def _param(gm: GraphModule, n, k: int) -> tuple[str, float] | None:
    """(get_attr target, offset) when n is a parameter of shape (k,), or offset + such a parameter."""
    n = _through_casts(n)
    offset = 0.0
    if isinstance(n, Node) and n.target is aten.add.Tensor and isinstance(n.args[1], (int, float)):
        offset, n = float(n.args[1]), _through_casts(n.args[0])
    if isinstance(n, Node) and n.op == "get_attr":
        t = get_attr_tensor(gm, n.target)
        if isinstance(t, torch.Tensor) and tuple(t.shape) == (k,):
            return n.target, offset
    return None


def _linear_rows(n) -> tuple[Node, int] | None:
    """(linear node, first row) when n is consecutive output channels of a linear: the
    linear itself, a slice of its last dim, or a chunk of it; casts are transparent."""
    n = _through_casts(n)
    offset = 0
    if isinstance(n, Node) and n.target is operator.getitem and isinstance(n.args[0], Node) \
            and n.args[0].target in (aten.chunk.default, aten.split.Tensor) \
            and n.args[0].args[-1] in (-1, len(n.meta["val"].shape) - 1):  # pieces along the last dim
        offset, n = n.args[1] * int(n.meta["val"].shape[-1]), _through_casts(n.args[0].args[0])
    elif isinstance(n, Node) and n.target is aten.slice.Tensor:
        ndim = len(n.args[0].meta["val"].shape)
        if n.args[1] in (-1, ndim - 1):
            offset, n = n.args[2], _through_casts(n.args[0])
    if isinstance(n, Node) and n.target in LINEAR_TARGETS and n.args[1].op == "get_attr":
        return n, offset
    return None


def _linear_fold(gm: GraphModule, lin: Node, rows: list[int], head_dim: int | None = None) -> Fold:
    targets = [lin.args[1].target]
    if len(lin.args) > 2 and isinstance(lin.args[2], Node):
        targets.append(lin.args[2].target)
    return Fold("rows", tuple(targets), rows=tuple(rows), head_dim=head_dim)


def _value_source(value: Node) -> Node:
    """Walk from attention's value input back through head reshapes and kv-head repeats."""
    n = value
    while isinstance(n, Node) and n.op == "call_function" and (
        n.target in HEAD_LAYOUT or n.target in CASTS
        or (n.target is aten.slice.Tensor and n.args[2] == 0 and n.args[3] >= 2**62)
    ):
        n = n.args[0]
    return n


def _attention_fold(gm: GraphModule, x: Node, k: int) -> tuple[Fold | None, str]:
    n = x
    while isinstance(n, Node) and n.op == "call_function" and (n.target in HEAD_LAYOUT or n.target in CASTS):
        if len(_users(n)) != 1:
            return None, f"{n.name} is read elsewhere"
        n = n.args[0]
    if not (isinstance(n, Node) and n.target in ATTENTION):
        return None, ""
    value = n.args[2]
    head_dim = int(value.meta["val"].shape[-1])
    src = _value_source(value)
    found = _linear_rows(src)
    if found is None:
        return None, "attention value does not come from a linear's output"
    lin, offset = found
    kvh = int(src.meta["val"].shape[-1]) // head_dim  # the value channels: KVH * head_dim
    heads = k // head_dim
    if kvh < 1 or heads % kvh:
        return None, f"attention heads ({heads}) are not a multiple of the value heads ({kvh})"
    rep = heads // kvh
    rows = [offset + ((c // head_dim) // rep) * head_dim + c % head_dim for c in range(k)]
    return _linear_fold(gm, lin, rows, head_dim), ""


def _producer_fold(gm: GraphModule, x: Node, k: int, consumers: set[Node]) -> tuple[Fold | None, str]:
    p = _through_casts(x)
    if not isinstance(p, Node) or p.op != "call_function":
        return None, f"input is {getattr(p, 'op', type(p).__name__)} (no producer to fold into)"
    # every user of the producer's output (through casts) must be a consumer of the region
    frontier, seen = [p], set()
    while frontier:
        n = frontier.pop()
        for u in _users(n):
            if u in seen:
                continue
            seen.add(u)
            if _keeps_channels(u):
                frontier.append(u)
            elif u.op == "call_module" and u not in consumers:
                frontier.append(u)  # an observer passes values through
            elif u not in consumers:
                return None, f"{p.name} is also read by {u.name} ({u.target})"
    if p.target is aten.layer_norm.default:
        weight, bias = (list(p.args[2:4]) + [None, None])[:2]
        if not (isinstance(weight, Node) and weight.op == "get_attr"):
            return None, f"{p.name}: LayerNorm weight is not a parameter ({getattr(weight, 'name', weight)})"
        if bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr"):
            return None, f"{p.name}: LayerNorm bias is not a parameter ({getattr(bias, 'name', bias)})"
        return Fold("norm", (weight.target,) + ((bias.target,) if bias is not None else ())), ""
    if p.target is aten.mul.Tensor:
        for a in p.args:
            found = _param(gm, a, k)
            if found is not None:
                target, offset = found
                if sum(n.op == "get_attr" and n.target == target for n in gm.graph.nodes) > 1:
                    return None, f"{target} is also read elsewhere"
                return Fold("norm", (target,), offset=offset), ""
        for a in p.args:
            found = _linear_rows(a)
            if found is not None:
                lin, offset = found
                return _linear_fold(gm, lin, list(range(offset, offset + k))), ""
        return None, f"{p.name}: a product with no parameter or linear operand"
    if p.target is aten.relu.default:
        found = _linear_rows(p.args[0])
        if found is not None:
            lin, offset = found
            return _linear_fold(gm, lin, list(range(offset, offset + k))), ""
    fold, reason = _attention_fold(gm, x, k)
    if fold is not None or reason:
        return fold, reason
    return None, f"input comes from {p.target} (not a norm, product, ReLU or attention)"


def find_regions(gm: GraphModule, linears: list[Node] | None = None) -> list[Region]:
    """Regions over `linears` (default: every linear with a parameter weight), in graph order."""
    from qfx.graph import linear_nodes

    linears = linear_nodes(gm) if linears is None else linears
    groups: dict[Node, list[Node]] = {}
    for lin in linears:
        groups.setdefault(_skip_observers(gm, lin.args[0]), []).append(lin)
    regions = []
    for x, lins in groups.items():
        k = get_attr_tensor(gm, lins[0].args[1].target).shape[1]
        consumers = set(lins)
        fold, reason = _producer_fold(gm, x, k, consumers)
        shared = [n.args[1].target for n in lins
                  if sum(a.op == "get_attr" and a.target == n.args[1].target for a in gm.graph.nodes) > 1]
        if fold is not None and shared:
            fold, reason = None, f"{shared[0]} is also read elsewhere (tied weights)"
        p = _through_casts(x)
        producer = (module_path(p) or p.name) if isinstance(p, Node) else str(p)
        if fold is not None and fold.kind == "rows":  # name the linear, not the op after it
            producer = fold.targets[0].rsplit(".", 1)[0]
        regions.append(Region(producer, tuple(module_path(n) or n.name for n in lins),
                              tuple(n.args[1].target for n in lins), k, fold, reason))
    return regions


def apply_scale(modules: list[torch.nn.Module], region: Region, s: torch.Tensor) -> None:
    """Fold s (K,) positive into `region`: producer / s, each linear's columns * s.

    The tensors are rebound (not changed in place) on every module of `modules`, which hold
    them at the same targets (a graph and its stages); the source of truth is modules[0].
    """
    if region.fold is None:
        raise ValueError(f"region {region.name} cannot take a scale: {region.reason}")
    s = region.tie(s.double())
    src = modules[0]

    def rebind(target: str, value: torch.Tensor) -> None:
        for m in modules:
            old = get_attr_tensor(m, target)
            set_attr_tensor(m, target, value.to(device=old.device, dtype=old.dtype))

    def read(target: str) -> torch.Tensor:
        return get_attr_tensor(src, target).detach().double()

    fold = region.fold
    if fold.kind == "norm":
        w = read(fold.targets[0])
        rebind(fold.targets[0], (w + fold.offset) / s.to(w.device) - fold.offset)
        if len(fold.targets) > 1:
            rebind(fold.targets[1], read(fold.targets[1]) / s.to(w.device))
    else:
        rows = torch.tensor(fold.rows)
        for target in fold.targets:  # weight (N, K'), then bias (N,)
            t = read(target).clone()
            scale = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
            scale[rows.to(t.device)] = s.to(t.device)
            rebind(target, t / (scale[:, None] if t.dim() == 2 else scale))
    for target in region.weights:
        w = read(target)
        rebind(target, w * s.to(w.device))
