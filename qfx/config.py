"""Quantization configuration: frozen dataclasses checked on construction, and recipe strings.

A `Recipe` says what to do to a model: which algorithms run (`methods`, left to right), how
weights and activations are quantized (`QuantSpec`), and per-layer `LayerRule`s matched on
module paths. A recipe string is a short form of the same thing:

    "rtn w4 g128 sym"                 4-bit symmetric weights, groups of 128, bf16 activations
    "rtn w8 g0 a8"                    int8 per-channel weights, int8 dynamic per-token activations
    "rtn w4 g64 asym a8 rule:down_proj=w8"   ... and 8-bit weights for every down_proj
    "gptq w4 g128 sym act-order damp0.01"    GPTQ, columns by decreasing Hessian diagonal
    "rtn fp8"                         fp8 e4m3 per-channel weights and per-token activations

Tokens: `wN` weight bits (16 = not quantized), `gN` group size (0 or -1 = per channel),
`sym`/`asym`, `aN` activation bits (16 = none), `a-static` static per-tensor activations,
`clipR` weight clip ratio, `a-clipR` activation clip ratio, `fp8`, `scale-model` (weight scales
rounded to the model dtype), `kvN` (KV cache: asymmetric int N per token and head) and `kv-gN`
(... in groups of N along the head dim), `rule:REGEX=SPEC` where SPEC is `skip`, `wN`, `wN.gM`
or `aN` (several joined by `.`); and each method's own settings (`damp0.05`, `no-act-order`,
`sq-alpha-search`, `spin-steps20`, ...), declared in `qfx.options`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from qfx import options as O
from qfx.options import (AWQOptions, GPTAQOptions, GPTQOptions, RotationOptions, SmoothQuantOptions,
                         SpinQuantOptions)

GRANULARITIES = ("tensor", "channel", "group", "token")
DTYPES = ("int", "fp8")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
SCALE_DTYPES = ("float32", "model")
# Methods this version can run; later passes register themselves here.
METHODS: dict[str, str] = {
    "rtn": "round-to-nearest, no calibration needed for weights",
    "gptq": "GPTQ: Hessian-weighted error feedback over columns (needs calibration)",
    "gptaq": "GPTAQ: GPTQ towards the full-precision model's outputs from the quantized model's inputs",
    "smoothquant": "SmoothQuant: move activation outliers into weights by per-channel scales folded into the producer",
    "awq": "AWQ: activation-aware per-channel scales found by grid search on the block output, then clip search",
    "awq+": "AWQ+: AWQ scales, asymmetric clip search, then GPTQ",
    "quarot": "QuaRot: random Hadamard rotations of the residual stream and heads folded into the weights, "
              "online Hadamards before down_proj and on queries/keys (exact; for low-bit activations and KV cache)",
    "spinquant": "SpinQuant: QuaRot's rotations, with R1 and R2 learned by Cayley SGD on the quantized model's "
                 "loss over the calibration data",
}
# methods that choose the integer weights; the last one in a pipeline wins (awq+ ends in GPTQ)
WEIGHT_METHODS = ("rtn", "gptq", "gptaq", "awq+")
# equivalence transforms and weight edits run before the weights are chosen, in pipeline order
TRANSFORM_METHODS = ("smoothquant", "awq", "awq+")
# whole-model rotations, applied when the graph is prepared, before anything is observed
ROTATION_METHODS = ("quarot", "spinquant")


class ConfigError(ValueError):
    """A quantization setting that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor kind (weights or activations) is quantized.

    bits: 2..8 for int; 8 for fp8 (e4m3).
    granularity: "tensor" (one scale), "channel" (one per output row of a weight),
        "group" (one per `group_size` consecutive input features; a last group may be shorter),
        "token" (activations: one per row, computed at run time).
    dynamic: activation scales computed per call (True) or fixed from calibration (False).
    clip_ratio: the range used is clip_ratio * observed range (1.0 = no clipping).
    observer: statistic for static ranges: minmax | moving_average | percentile | mse.
    scale_dtype: "float32" keeps weight scales exact; "model" rounds them to the model's
        dtype before the codes are chosen, so that serving engines, which hold scales in the
        model dtype, compute exactly what qfx measured.
    """

    bits: int = 4
    dtype: str = "int"
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 128
    dynamic: bool = False
    clip_ratio: float = 1.0
    observer: str = "minmax"
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"QuantSpec.dtype={self.dtype!r}: choose one of {DTYPES}")
        if self.dtype == "fp8" and self.bits != 8:
            raise ConfigError(f"QuantSpec.bits={self.bits} with dtype='fp8': fp8 (e4m3) has 8 bits")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(
                f"QuantSpec.bits={self.bits!r}: integer quantization supports 2..8 bits "
                "(use no spec, or 16 on the command line, for full precision)"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"QuantSpec.granularity={self.granularity!r}: choose one of {GRANULARITIES}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ConfigError(
                    f"QuantSpec.group_size={self.group_size!r} with granularity='group': "
                    "give a positive group size, or granularity='channel' for one group per row"
                )
        elif self.group_size is not None:
            raise ConfigError(
                f"QuantSpec.group_size={self.group_size} only applies to granularity='group' "
                f"(got granularity={self.granularity!r})"
            )
        if self.dtype == "fp8" and not self.symmetric:
            raise ConfigError("QuantSpec: fp8 quantization is symmetric; drop symmetric=False")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"QuantSpec.clip_ratio={self.clip_ratio}: must be in (0, 1]")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"QuantSpec.observer={self.observer!r}: choose one of {OBSERVERS}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"QuantSpec.scale_dtype={self.scale_dtype!r}: choose one of {SCALE_DTYPES}")
        if self.granularity == "token" and not self.dynamic:
            raise ConfigError("QuantSpec: per-token scales are computed at run time; set dynamic=True")

    def short(self) -> str:
        """Compact human-readable form, e.g. 'int4 g64 asym'."""
        kind = "fp8" if self.dtype == "fp8" else f"int{self.bits}"
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        sym = "sym" if self.symmetric else "asym"
        dyn = " dynamic" if self.dynamic else ""
        return f"{kind} {gran} {sym}{dyn}"


def weight_spec(
    bits: int, group_size: int = 128, symmetric: bool = True, clip_ratio: float = 1.0, scale_dtype: str = "float32"
) -> QuantSpec:
    """Weight spec with the command-line conventions: group 0 or -1 means per channel."""
    per_channel = group_size in (0, -1)
    return QuantSpec(
        bits=bits,
        symmetric=symmetric,
        granularity="channel" if per_channel else "group",
        group_size=None if per_channel else group_size,
        clip_ratio=clip_ratio,
        scale_dtype=scale_dtype,
    )


def act_spec(bits: int, dynamic: bool = True, fp8: bool = False, scale_dtype: str = "float32",
             clip_ratio: float = 1.0) -> QuantSpec:
    """Activation spec: symmetric, per-token dynamic (default) or per-tensor static.

    clip_ratio: the range is clip_ratio * max|x| of each token (dynamic) or of the observed
    range (static); int only.
    """
    if fp8 and clip_ratio != 1.0:
        raise ConfigError(f"activation clip ratio {clip_ratio} with fp8: fp8 activations are not clipped; "
                          "drop the clip ratio")
    return QuantSpec(
        clip_ratio=clip_ratio,
        scale_dtype=scale_dtype,
        bits=8 if fp8 else bits,
        dtype="fp8" if fp8 else "int",
        symmetric=True,
        granularity="token" if dynamic else "tensor",
        group_size=None,
        dynamic=dynamic,
    )


_UNSET = "unset"


@dataclass(frozen=True)
class LayerRule:
    """Override for the linears whose module path matches `pattern` (a regex, `re.search`).

    weight / act: a QuantSpec, None for full precision, or left unset to keep the recipe's.
    Rules are tried in order; the first match wins. A rule also opts the LM head in, which
    the recipe otherwise keeps in full precision.
    """

    pattern: str
    weight: QuantSpec | None | str = _UNSET
    act: QuantSpec | None | str = _UNSET

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"LayerRule.pattern={self.pattern!r} is not a valid regex: {e}") from None
        for name in ("weight", "act"):
            v = getattr(self, name)
            if not (v is None or v == _UNSET or isinstance(v, QuantSpec)):
                raise ConfigError(f"LayerRule.{name} must be a QuantSpec or None, got {v!r}")

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


@dataclass(frozen=True)
class Recipe:
    """A quantization pipeline: methods (left to right), default specs, per-layer rules.

    weight: spec for linear weights (None: weights stay in full precision).
    act: spec for linear inputs (None: activations stay in full precision).
    kv: spec for the KV cache: keys (after rotation, with quarot) and values as attention reads
        them back from an asymmetric int cache (granularity "token": one range per token and
        head; "group": per group of `group_size` along the head dim).
    quantize_head: quantize the linear that produces the logits (off by default, as in the field).
    rotation_path: a safetensors file of rotations to use instead of QuaRot's random ones
        ({"R1": (D, D), "R2.<o_proj path>": (head_dim, head_dim)}), e.g. learned ones.
    gptq, gptaq, awq, smoothquant, rotation, spinquant: each method's own settings
        (`qfx.options`, where each is documented).
    """

    @property
    def weight_method(self) -> str:
        """The method that chooses integer weights: the last of WEIGHT_METHODS in the pipeline."""
        m = next((m for m in reversed(self.methods) if m in WEIGHT_METHODS), "rtn")
        return "gptq" if m == "awq+" else m

    methods: tuple[str, ...] = ("rtn",)
    weight: QuantSpec | None = field(default_factory=lambda: weight_spec(4, 128, True))
    act: QuantSpec | None = None
    kv: QuantSpec | None = None
    rules: tuple[LayerRule, ...] = ()
    quantize_head: bool = False
    rotation_path: str | None = None
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    gptaq: GPTAQOptions = field(default_factory=GPTAQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)
    smoothquant: SmoothQuantOptions = field(default_factory=SmoothQuantOptions)
    rotation: RotationOptions = field(default_factory=RotationOptions)
    spinquant: SpinQuantOptions = field(default_factory=SpinQuantOptions)

    def __post_init__(self) -> None:
        for group in O.GROUPS:
            if problem := O.check(group, getattr(self, group)):
                raise ConfigError(problem)
        if not self.methods:
            raise ConfigError("Recipe.methods is empty: give at least one method, e.g. ('rtn',)")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"unknown method {m!r}: choose from {', '.join(sorted(METHODS))}")
        if self.weight is None and self.act is None and self.kv is None and not self.rules:
            raise ConfigError("Recipe quantizes nothing: give a weight, activation or KV-cache spec")
        if self.act is not None and not self.act.symmetric:
            raise ConfigError("Recipe.act: activation quantization is symmetric in qfx; drop asym")
        if self.act is not None and self.act.granularity not in ("token", "tensor"):
            raise ConfigError(f"Recipe.act: granularity {self.act.granularity!r}; use 'token' or 'tensor'")
        if self.kv is not None and (self.kv.dtype != "int" or not self.kv.dynamic
                                    or self.kv.granularity not in ("token", "group")):
            raise ConfigError(f"Recipe.kv: {self.kv.short()}; the KV cache takes dynamic int quantization per token "
                              "(granularity 'token') or per group along the head dim ('group')")
        if self.rotation_path is not None and not any(m in ROTATION_METHODS for m in self.methods):
            raise ConfigError("Recipe.rotation_path is given but no rotation method (quarot, spinquant) is in "
                              "the pipeline")
        if sum(m in ROTATION_METHODS for m in self.methods) > 1:
            raise ConfigError(f"Recipe.methods {self.methods}: give one rotation method (quarot or spinquant)")

    def resolve(self, path: str, is_head: bool) -> tuple[QuantSpec | None, QuantSpec | None]:
        """(weight spec, act spec) for the linear at module path `path`."""
        for rule in self.rules:
            if rule.matches(path):
                w = self.weight if rule.weight == _UNSET else rule.weight
                a = self.act if rule.act == _UNSET else rule.act
                return w, a
        if is_head and not self.quantize_head:
            return None, None
        return self.weight, self.act

    # -- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        def spec(x):
            return None if x is None else QuantSpec(**x)

        def rule_field(x):
            return x if x is None or x == _UNSET else QuantSpec(**x)

        return Recipe(
            methods=tuple(d["methods"]),
            weight=spec(d.get("weight")),
            act=spec(d.get("act")),
            kv=spec(d.get("kv")),
            rules=tuple(
                LayerRule(r["pattern"], rule_field(r["weight"]), rule_field(r["act"])) for r in d.get("rules", ())
            ),
            quantize_head=bool(d.get("quantize_head", False)),
            rotation_path=d.get("rotation_path"),
            **O.from_saved(d),
        )

    @staticmethod
    def parse(text: str) -> "Recipe":
        """Parse a recipe string (see the module docstring)."""
        tokens = text.split()
        if not tokens:
            raise ConfigError("empty recipe string; e.g. 'rtn w4 g128 sym'")
        methods: tuple[str, ...] = ("rtn",)
        if not _is_option(tokens[0]):
            methods = tuple(tokens[0].split(","))
            tokens = tokens[1:]
        w_bits, group, sym, clip, scale_dtype = 4, 128, True, 1.0, "float32"
        a_bits, a_dynamic, fp8, a_clip = 16, True, False, 1.0
        rules: list[LayerRule] = []
        kv, kv_group = None, 0
        groups: dict[str, dict] = {g: {} for g in O.GROUPS}
        seen: dict[str, str] = {}
        for tok in tokens:
            key = _setting(tok)
            if key in seen and not tok.startswith("rule:"):
                hint = " (a KV-cache group is kv-gN)" if key == "g" else ""
                raise ConfigError(f"recipe {text!r} sets one thing twice: {seen[key]!r} and {tok!r}; keep one{hint}")
            seen[key] = tok
            if m := re.fullmatch(r"w(\d+)", tok):
                w_bits = int(m[1])
            elif m := re.fullmatch(r"g(-?\d+)", tok):
                group = int(m[1])
            elif tok in ("sym", "asym"):
                sym = tok == "sym"
            elif m := re.fullmatch(r"a(\d+)", tok):
                a_bits = int(m[1])
            elif m := re.fullmatch(r"a-clip(0?\.\d+|1(\.0*)?)", tok):
                a_clip = float(m[1])
            elif tok == "a-static":
                a_dynamic = False
            elif m := re.fullmatch(r"clip(0?\.\d+|1(\.0*)?)", tok):
                clip = float(m[1])
            elif tok == "fp8":
                fp8 = True
            elif tok == "scale-model":
                scale_dtype = "model"
            elif m := re.fullmatch(r"kv(\d+)", tok):
                kv = int(m[1])
            elif m := re.fullmatch(r"kv-g(\d+)", tok):
                kv_group = int(m[1])
            elif tok.startswith("rule:"):
                rules.append(_parse_rule(tok[5:]))
            elif found := O.parse_token(tok):
                method, name, value = found
                groups[method][name] = value
            else:
                raise ConfigError(f"recipe token {tok!r} not understood in {text!r} (see qfx.config docstring)")
        if fp8:
            weight = QuantSpec(bits=8, dtype="fp8", granularity="channel", group_size=None, scale_dtype=scale_dtype)
            act = act_spec(8, a_dynamic, fp8=True, scale_dtype=scale_dtype, clip_ratio=a_clip)
        else:
            weight = None if w_bits == 16 else _checked_weight(w_bits, group, sym, clip, scale_dtype)
            if a_bits == 16 and a_clip != 1.0:
                raise ConfigError(f"a-clip{a_clip} in {text!r}: activations are not quantized; add aN (e.g. a4)")
            act = None if a_bits == 16 else act_spec(a_bits, a_dynamic, scale_dtype=scale_dtype, clip_ratio=a_clip)
        kv_spec = None
        if kv is not None and kv != 16:
            kv_spec = QuantSpec(bits=kv, symmetric=False, granularity="group" if kv_group else "token",
                                group_size=kv_group or None, dynamic=True)
        return Recipe(methods=methods, weight=weight, act=act, kv=kv_spec, rules=tuple(rules),
                      **{g: O.GROUPS[g](**values) for g, values in groups.items()})


_OPTION = re.compile(r"w\d+|g-?\d+|a\d+|a-static|sym|asym|fp8|scale-model|kv\d+|kv-g\d+|clip.*|a-clip.*|rule:.*")


def _is_option(token: str) -> bool:
    return bool(_OPTION.fullmatch(token)) or O.parse_token(token) is not None


def _setting(token: str) -> str:
    """What a recipe token sets, e.g. "g" for g128 and g-1, "sym" for sym and asym."""
    if token == "asym":
        return "sym"
    return O.setting_key(token) or re.sub(r"[-\d.]+$", "", token)


def _checked_weight(bits: int, group: int, sym: bool, clip: float, scale_dtype: str) -> QuantSpec:
    if group < -1:
        raise ConfigError(f"group size {group}: use a positive size, or 0 / -1 for per channel")
    return weight_spec(bits, group, sym, clip, scale_dtype)


def _parse_rule(text: str) -> LayerRule:
    if "=" not in text:
        raise ConfigError(f"rule {text!r}: write rule:REGEX=SPEC, e.g. rule:down_proj=w8 or rule:lm_head=skip")
    pattern, spec = text.rsplit("=", 1)
    if spec == "skip":
        return LayerRule(pattern, weight=None, act=None)
    weight: QuantSpec | None | str = _UNSET
    act: QuantSpec | None | str = _UNSET
    bits, group = None, 128
    for part in spec.split("."):
        if m := re.fullmatch(r"w(\d+)", part):
            bits = int(m[1])
        elif m := re.fullmatch(r"g(-?\d+)", part):
            group = int(m[1])
        elif m := re.fullmatch(r"a(\d+)", part):
            act = None if int(m[1]) == 16 else act_spec(int(m[1]))
        else:
            raise ConfigError(f"rule spec {spec!r}: parts are wN, gN, aN or 'skip'")
    if bits is not None:
        weight = None if bits == 16 else weight_spec(bits, group, True)
    return LayerRule(pattern, weight=weight, act=act)
