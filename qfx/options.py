"""Each method's own settings, one small frozen group per method; each setting is declared once.

A setting is one dataclass field made with `setting(...)`: its default, its recipe-string token,
its check and its one-line doc live there, and everything else is derived from it: the recipe
parser and printer (`qfx.config`), the `qfx quantize` flags (`qfx.cli_parser`), loading recipes saved
before the groups existed (`legacy`: the flat key they were saved under), and the option table
in docs/recipes.md (`option_table`). Adding a setting to a method is one field here.

Token forms: a number right after the token (`damp0.05`, `spin-steps20`); for booleans the token
turns the setting on and `no-<token>` off; `none_token` spells the value None (`sq-alpha-search`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

_NUMBER = r"(\d*\.?\d+)"


def setting(default: Any, token: str, doc: str, check: Callable[[Any], bool] | None = None, rule: str = "",
            legacy: str | None = None, saved_default: Any = dataclasses.MISSING, none_token: str | None = None,
            cli_value: str | None = None, flag: str | None = None) -> Any:
    """A dataclass field that is also a recipe token and a CLI flag.

    check / rule: what a valid value is (rule says it in words, for the error). legacy: the flat
    Recipe key recipes were saved under before the groups existed; saved_default: the value for
    such a recipe that lacks the key (when the default changed after they were saved).
    cli_value: the CLI flag's value for `none_token` (e.g. "search" for `--sq-alpha search`).
    flag: the `qfx quantize` flag when it is not `--<token>` (`--no-<token>` for booleans)."""
    meta = dict(token=token, doc=doc, check=check, rule=rule, legacy=legacy, none_token=none_token,
                saved_default=default if saved_default is dataclasses.MISSING else saved_default,
                cli_value=cli_value, flag=flag or f"--{token}")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = setting(0.01, "damp", "GPTQ/GPTAQ damping, a fraction of the mean Hessian diagonal",
                          lambda v: 0.0 < v < 1.0, "in (0, 1)", legacy="damp")
    act_order: bool = setting(True, "act-order", "GPTQ visits columns by decreasing Hessian diagonal, group "
                              "ranges fixed up front so groups stay contiguous (without it, 3-bit GPTQ of "
                              "SmolLM2 was worse than RTN)", legacy="act_order")
    range_search: bool = setting(True, "range-search", "act-order's static group ranges shrunk per row where that "
                                 "lowers the Hessian-diagonal-weighted rounding error",
                                 legacy="range_search", saved_default=False)
    sink_weight: float = setting(16.0, "sink", "weight of each calibration window's first token (the attention "
                                 "sink) in GPTQ/GPTAQ Hessians; 1 = plain mean", lambda v: v >= 1.0, ">= 1",
                                 legacy="sink_weight", flag="--sink-weight")


@dataclass(frozen=True)
class GPTAQOptions:
    alpha: float = setting(0.25, "gptaq-alpha", "how far GPTAQ moves towards the full-precision outputs (0 = GPTQ)",
                           lambda v: 0.0 <= v <= 1.0, "in [0, 1]", legacy="gptaq_alpha")


@dataclass(frozen=True)
class AWQOptions:
    search_samples: int = setting(16, "search", "calibration samples AWQ's scale search runs the block on",
                                  lambda v: v >= 1, ">= 1", legacy="search_samples", flag="--search-samples")


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float | None = setting(0.5, "sq-alpha", "SmoothQuant migration strength; sq-alpha-search searches "
                                  "0.2..0.8 per region on the quantized region's output error",
                                  lambda v: v is None or 0.0 <= v <= 1.0, "in [0, 1]", legacy="smooth_alpha",
                                  none_token="sq-alpha-search", cli_value="search")


@dataclass(frozen=True)
class RotationOptions:
    seed: int = setting(0, "rot-seed", "seed of QuaRot's random-sign Hadamard rotations (SpinQuant starts from them)",
                        lambda v: v >= 0, ">= 0", legacy="rotation_seed", flag="--rotation-seed")


@dataclass(frozen=True)
class SpinQuantOptions:
    steps: int = setting(100, "spin-steps", "SpinQuant's Cayley SGD steps", lambda v: v >= 1, ">= 1",
                         legacy="spin_steps")
    lr: float = setting(1.5, "spin-lr", "SpinQuant's Cayley SGD step size", lambda v: v > 0, "> 0", legacy="spin_lr")
    batch: int = setting(1, "spin-batch", "calibration samples whose gradients each SpinQuant step averages",
                         lambda v: v >= 1, ">= 1", legacy="spin_batch")


# Recipe field -> its group; the order is the order of tokens in a printed recipe
GROUPS: dict[str, type] = {"gptq": GPTQOptions, "gptaq": GPTAQOptions, "awq": AWQOptions,
                           "smoothquant": SmoothQuantOptions, "rotation": RotationOptions,
                           "spinquant": SpinQuantOptions}


def settings() -> list[tuple[str, dataclasses.Field]]:
    """(group name, field) of every setting."""
    return [(g, f) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]


def kind_of(f: dataclasses.Field) -> str:
    """"bool", "int" or "float" (a None-able float too): what the field's annotation says."""
    name = f.type if isinstance(f.type, str) else f.type.__name__  # a string under postponed annotations
    return name if name in ("bool", "int") else "float"


def token_for(f: dataclasses.Field, value: Any) -> str:
    """The recipe token that sets `f` to `value`."""
    m = f.metadata
    if kind_of(f) == "bool":
        return m["token"] if value else "no-" + m["token"]
    return m["none_token"] if value is None else f"{m['token']}{_number(value)}"


def check(group: str, options: Any) -> str | None:
    """The first invalid setting of one group, as an error message, or None."""
    for f in dataclasses.fields(options):
        value, check_value = getattr(options, f.name), f.metadata["check"]
        if check_value is not None and not check_value(value):
            return f"Recipe.{group}.{f.name}={value!r} ({f.metadata['token']}): must be {f.metadata['rule']}"
    return None


def parse_token(token: str) -> tuple[str, str, Any] | None:
    """(group, field, value) that a recipe token sets, or None if it is not a method setting."""
    for group, f in settings():
        m, kind = f.metadata, kind_of(f)
        if kind == "bool":
            if token in (m["token"], "no-" + m["token"]):
                return group, f.name, token == m["token"]
        elif m["none_token"] and token == m["none_token"]:
            return group, f.name, None
        elif kind == "int" and (hit := re.fullmatch(re.escape(m["token"]) + r"(\d+)", token)):
            return group, f.name, int(hit[1])
        elif kind == "float" and (hit := re.fullmatch(re.escape(m["token"]) + _NUMBER, token)):
            return group, f.name, float(hit[1])
    return None


def setting_key(token: str) -> str | None:
    """What a token sets ("gptq.damp"), to catch a recipe that sets one thing twice."""
    found = parse_token(token)
    return None if found is None else f"{found[0]}.{found[1]}"


def tokens(groups: dict[str, Any]) -> list[str]:
    """Recipe tokens for every setting that differs from its default."""
    return [token_for(f, getattr(groups[group], f.name)) for group, f in settings()
            if getattr(groups[group], f.name) != f.default]


def from_saved(d: dict) -> dict[str, Any]:
    """The groups of a saved recipe dict: nested (`{"gptq": {...}}`) or the earlier flat keys."""
    out = {}
    for group, cls in GROUPS.items():
        saved = d.get(group) if isinstance(d.get(group), dict) else {}
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in saved:
                values[f.name] = saved[f.name]
            else:
                values[f.name] = d.get(f.metadata["legacy"], f.metadata["saved_default"])
        out[group] = cls(**values)
    return out


def _number(value: float | int) -> str:
    """A setting's value as its token writes it: plain digits, never an exponent."""
    text = repr(value)
    return f"{value:.12f}".rstrip("0") if "e" in text else text


def option_table() -> str:
    """The Markdown table of every method setting (docs/recipes.md holds a copy, checked by a test)."""
    rows = ["| token | default | meaning |", "|---|---|---|"]
    for _group, f in settings():
        m = f.metadata
        if kind_of(f) == "bool":
            token, default = f"`{m['token']}` / `no-{m['token']}`", "on" if f.default else "off"
        else:
            number = "N" if kind_of(f) == "int" else "X"
            token = f"`{m['token']}{number}`" + (f", `{m['none_token']}`" if m["none_token"] else "")
            default = str(f.default)
        rows.append(f"| {token} | {default} | {m['doc']} |")
    return "\n".join(rows)
