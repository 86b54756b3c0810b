"""The residual stream of a captured decoder, read from data flow: what writes into it, which
norms read it, and which linears read those norms. Rotations (`qfx.passes.rotate`) and norm
folding (`qfx.passes.fold_norms`) rewrite exactly these tensors.

Starting at the token embedding's output, a value belongs to the stream when it is a cast,
a dropout, a reshape keeping the last dim or a scalar multiple of a stream value, or the sum of a stream value and a writer:

- writers: linears (o_proj, down_proj, ...) whose output is added to the stream and read by
  nothing else, and embedding lookups (learned positions) added to it;
- norms: RMSNorm `x * rsqrt(mean(x^2, -1) + eps)`, optionally times an elementwise weight
  `w` or `(offset + w)`, or LayerNorm (`qfx.passes.fold_norms` turns those into RMSNorms
  once the stream has zero mean); every reader of a norm's output must be a linear (through
  casts and slices that keep the last dim).

An orthogonal Q (D x D) on the stream (h -> h Q) is then exact: writers' rows and embedding
tables are rotated, the RMS of each token is unchanged, and readers take W Q once the norm
weight is folded into them. Anything else reading the stream (a residual that is not a plain
sum, a norm read by something other than linears) is listed in `problems`, each naming the node, and makes the model
non-rotatable here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from qfx.graph import get_attr_tensor, LINEAR_TARGETS, module_path
from qfx.regions import CASTS

aten = torch.ops.aten
PASS_THROUGH = CASTS | {aten.dropout.default, aten.native_dropout.default}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass
class Norm:
    node: Node  # x * rsqrt(...) (RMSNorm, before its weight) or the aten.layer_norm node
    weight: str | None  # get_attr target of the elementwise weight (D,), if any
    offset: float  # the weight enters as (offset + w)
    readers: list[Node]  # linears reading the norm's output
    bias: str | None = None  # LayerNorm's bias (D,)
    kind: str = "rms"  # "rms" or "layer" (subtracts each token's mean first)

    @property
    def name(self) -> str:
        return module_path(self.node) or self.node.name


@dataclass
class Stream:
    width: int
    embeddings: list[Node] = field(default_factory=list)  # aten.embedding nodes writing into it
    writers: list[Node] = field(default_factory=list)  # linears added into it
    norms: list[Norm] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _users(n: Node) -> list[Node]:
    return [u for u in n.users if u.target is not aten._assert_tensor_metadata.default]


def _is_scalar(a) -> bool:
    """A Python number or a one-element tensor (sizes checked as ints: a symbolic batch or
    sequence size is never taken for 1)."""
    if isinstance(a, (int, float)):
        return True
    val = a.meta.get("val") if isinstance(a, Node) else None
    return isinstance(val, torch.Tensor) and all(type(d) is int and d == 1 for d in val.shape)


def _keeps_last_dim(n: Node) -> bool:
    """A reshape that leaves the last dim alone (GPT-2's (B, S, D) <-> (B * S, D) around Conv1D)."""
    return n.target in RESHAPES and isinstance(n.args[0], Node) \
        and n.meta["val"].shape[-1] == n.args[0].meta["val"].shape[-1]


def _strip(n):
    """Through casts, dropouts and last-dim-keeping reshapes to the value's source."""
    while isinstance(n, Node) and n.op == "call_function" and (n.target in PASS_THROUGH or _keeps_last_dim(n)):
        n = n.args[0]
    return n


def _rms_of(r, x: Node) -> bool:
    """r == rsqrt(mean(x^2, -1, keepdim) + eps), casts allowed."""
    r = _strip(r)
    if not (isinstance(r, Node) and r.target is aten.rsqrt.default):
        return False
    a = _strip(r.args[0])
    if isinstance(a, Node) and a.target is aten.add.Tensor and _is_scalar(a.args[1]):
        a = _strip(a.args[0])
    if not (isinstance(a, Node) and a.target is aten.mean.dim and list(a.args[1]) in ([-1], [x.meta["val"].dim() - 1])):
        return False
    p = _strip(a.args[0])
    return isinstance(p, Node) and p.target is aten.pow.Tensor_Scalar and p.args[1] == 2 and _strip(p.args[0]) is _strip(x)


def _embedding_of(n) -> Node | None:
    n = _strip(n)
    if isinstance(n, Node) and n.target is aten.embedding.default and n.args[0].op == "get_attr":
        return n
    return None


def _layer_norm(gm: GraphModule, ln: Node, width: int, stream: Stream) -> Norm | None:
    """A LayerNorm over the stream's width: weight and bias from its arguments, then readers."""
    if list(ln.args[1]) != [width]:
        stream.problems.append(f"{ln.name}: a LayerNorm over {list(ln.args[1])}, not the last dim")
        return None
    params = []
    for what, a in zip(("weight", "bias"), (*ln.args[2:4], None, None)):
        if a is not None and not (isinstance(a, Node) and a.op == "get_attr"):  # e.g. (1 + w), LayerNorm1P
            stream.problems.append(f"{ln.name}: a LayerNorm whose {what} is computed ({getattr(a, 'name', a)}), "
                                   "not a parameter")
            return None
        params.append(None if a is None else a.target)
    norm = Norm(ln, params[0], 0.0, [], bias=params[1], kind="layer")
    readers = _readers(ln, stream)
    if readers is None:
        return None
    norm.readers = readers
    return norm


def _norm_readers(gm: GraphModule, xhat: Node, width: int, stream: Stream) -> Norm | None:
    """From the normalised value: the optional weight, then linears reading the result."""
    from qfx.regions import _param

    weight, offset, out = None, 0.0, xhat
    users = _users(xhat)
    while len(users) == 1 and users[0].target in CASTS and users[0].args[0] is out:
        out = users[0]
        users = _users(out)
    if len(users) == 1 and users[0].target is aten.mul.Tensor:
        for a in users[0].args:
            if a is not out and (found := _param(gm, a, width)) is not None:
                weight, offset = found
                out = users[0]
    readers = _readers(out, stream)
    return None if readers is None else Norm(xhat, weight, offset, readers)


def _readers(out: Node, stream: Stream) -> list[Node] | None:
    """Linears reading `out` through casts and slices that keep the last dim (None: a problem)."""
    readers, frontier = [], [out]
    while frontier:
        n = frontier.pop()
        for u in _users(n):
            if u.target in LINEAR_TARGETS and u.args[0] is n and u.args[1].op == "get_attr":
                readers.append(u)
            elif (u.target in CASTS or _keeps_last_dim(u)) and u.args[0] is n:
                frontier.append(u)
            elif u.target is aten.type_as.default and u.args[1] is n:
                continue  # n only gives the dtype
            elif u.target is aten.slice.Tensor and u.args[1] not in (-1, n.meta["val"].dim() - 1):
                frontier.append(u)
            else:
                stream.problems.append(f"norm output {n.name} is read by {u.name} ({u.target}), not a linear")
                return None
    return readers


def find_stream(gm: GraphModule) -> Stream:
    """The residual stream of `gm` (see the module docstring); check `problems` before use."""
    start = next((n for n in gm.graph.nodes if _embedding_of(n) is n), None)
    if start is None:
        return Stream(0, problems=["no token embedding (aten.embedding of a parameter) starts a residual stream"])
    width = int(start.meta["val"].shape[-1])
    stream = Stream(width, embeddings=[start])
    members, frontier = {start}, [start]
    norm_nodes: set[Node] = set()
    while frontier:
        s = frontier.pop(0)
        for u in _users(s):
            if u in members or u in norm_nodes:
                continue
            t = u.target
            if t in PASS_THROUGH and u.args[0] is s:
                members.add(u), frontier.append(u)
            elif t is aten.type_as.default and u.args[1] is s:
                continue  # s only gives the dtype
            elif t is aten.mul.Tensor and _is_scalar(u.args[1] if u.args[0] is s else u.args[0]):
                members.add(u), frontier.append(u)  # e.g. Gemma's sqrt(hidden) embedding scale
            elif t is aten.add.Tensor and s in u.args[:2]:
                other = u.args[1] if u.args[0] is s else u.args[0]
                if other not in members and not _add_writer(gm, u, other, stream):
                    continue
                members.add(u), frontier.append(u)
            elif t is aten.pow.Tensor_Scalar and u.args[1] == 2:
                continue  # part of an RMSNorm, checked through its rsqrt product below
            elif t is aten.mul.Tensor and any(a is not s and _rms_of(a, s) for a in u.args):
                norm_nodes.add(u)
                norm = _norm_readers(gm, u, width, stream)
                if norm is not None:
                    stream.norms.append(norm)
            elif t is aten.layer_norm.default and u.args[0] is s:
                norm = _layer_norm(gm, u, width, stream)
                if norm is not None:
                    stream.norms.append(norm)
            elif t in RESHAPES and u.args[0] is s and int(u.meta["val"].shape[-1]) == width:
                members.add(u), frontier.append(u)  # e.g. OPT's (B, S, D) -> (B * S, D) around its MLP
            else:
                stream.problems.append(f"{u.name} ({t}) reads the residual stream {s.name}; only casts, sums with "
                                       "linear outputs and RMSNorms are understood")
    for s in members:  # every pow(x, 2) reading the stream must belong to a norm found above
        for u in _users(s):
            if u.target is aten.pow.Tensor_Scalar and not any(
                    _rms_of(a, s) for n in norm_nodes for a in n.args if isinstance(a, Node)):
                stream.problems.append(f"{u.name}: a square of the stream outside an RMSNorm")
    return stream


def _add_writer(gm: GraphModule, add: Node, other, stream: Stream) -> bool:
    src = _strip(other)
    if isinstance(src, Node) and src.target in LINEAR_TARGETS and src.args[1].op == "get_attr":
        chain, n = [src], src
        while n is not add:  # the linear's output must reach only this sum
            users = _users(n)
            if len(users) != 1:
                stream.problems.append(f"{module_path(src) or src.name}: its output is read by "
                                       f"{', '.join(u.name for u in users)} besides the residual sum")
                return False
            n = users[0]
            chain.append(n)
        stream.writers.append(src)
        return True
    emb = _embedding_of(src)
    if emb is not None and int(get_attr_tensor(gm, emb.args[0].target).shape[-1]) == stream.width:
        stream.embeddings.append(emb)
        return True
    stream.problems.append(f"{add.name} adds {getattr(src, 'name', src)} ({getattr(src, 'target', '')}) to the "
                           "residual stream; only linear outputs and embeddings are understood")
    return False
