"""Graph passes: each takes a GraphModule, rewrites it in place, lints, recompiles, returns it,
and records how many sites it rewrote in `gm.meta["qfx"]["counts"][<pass name>]`.
See README.md in this folder for what each pass requires and guarantees."""

from __future__ import annotations

from torch.fx import GraphModule


def finish(gm: GraphModule, name: str, count: int) -> GraphModule:
    """Common epilogue: record the rewrite count, lint, recompile."""
    gm.meta.setdefault("qfx", {}).setdefault("counts", {})[name] = count
    gm.graph.lint()
    gm.recompile()
    return gm


def counts(gm: GraphModule) -> dict[str, int]:
    """Rewrite counts of the passes run so far on `gm`."""
    return dict(gm.meta.get("qfx", {}).get("counts", {}))
