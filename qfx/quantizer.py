"""The quantizer, defined once: a weight spec -> the tensors the quantized op stores, and the
values the op computes with. Every search (SmoothQuant's alpha, AWQ's scales, SpinQuant's
rotations) fake-quantizes through these functions, so it optimises exactly what runs.

    quantize_weight_tensors(w, spec)        -> {"qweight", "w_scale", ["w_zero"]}   (convert)
    fake_quantize_weight(w, spec)           -> dequant(those tensors), float32 (N, K)
    fake_quantize_activation(x, spec)       -> what the op's activation quantizer gives x, float32
"""

from __future__ import annotations

import torch

from qfx import primitives as P
from qfx.config import QuantSpec
from qfx.ops import fake_quantize_activation as op_fake_quantize_activation


def op_group_size(spec: QuantSpec) -> int:
    """The op's group_size argument: 0 means one group per row."""
    return spec.group_size if spec.granularity == "group" else 0


def quantize_weight_tensors(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Weight (N, K) -> the op's stored tensors: qweight, w_scale (N, G) float32, w_zero.

    Scales stay float32 unless the spec stores them in the model dtype: then each group takes,
    among the representable scales next to its own, the one that reconstructs it best (plain
    rounding shifts every weight of a group by the same factor, up to 0.4 % in bfloat16).
    """
    codes, scale, zero = _codes(w, spec)
    if spec.dtype == "fp8":
        return {"qweight": codes, "w_scale": scale}
    out = {"qweight": P.pack(codes, spec.bits), "w_scale": scale}
    if zero is not None:
        out["w_zero"] = zero
    return out


def _codes(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (N, K) unpacked uint8, or float8 for fp8; scales (N, G) float32; zero points or None)."""
    if spec.dtype == "fp8":
        amax = w.detach().float().abs().amax(-1, keepdim=True) * spec.clip_ratio
        scale = round_scale(P.fp8_scale(amax), spec, w.dtype)
        return P.fp8_quantize(w, scale), scale, None
    if spec.granularity == "tensor":
        scale, zero = P.choose_qparams(w.amin() * spec.clip_ratio, w.amax() * spec.clip_ratio, spec.bits, spec.symmetric)
        scale = scale.reshape(1, 1).expand(w.shape[0], 1).contiguous()
        zero = None if zero is None else zero.reshape(1, 1).expand(w.shape[0], 1).contiguous()
    else:
        scale, zero = P.weight_qparams(w.detach(), spec.bits, spec.symmetric, spec.group_size, spec.clip_ratio)
    scale = _model_dtype_scale(w.detach(), scale, zero, spec, op_group_size(spec))
    return P.quantize_weight(w.detach(), scale, zero, spec.bits, op_group_size(spec) or None), scale, zero


def _model_dtype_scale(w: torch.Tensor, scale: torch.Tensor, zero, spec: QuantSpec, group: int) -> torch.Tensor:
    """Int weight scales (N, G): as they are, or, when the spec stores them in the model dtype,
    the representable scale next to each that reconstructs its group best (`P.representable_scale`)."""
    if spec.scale_dtype != "model" or w.dtype in (torch.float32, torch.float64):
        return scale
    g = group or w.shape[-1]
    best = P.representable_scale(P.to_groups(w.float(), g), scale.unsqueeze(-1), None if zero is None else
                                 zero.unsqueeze(-1), spec.bits, w.dtype)
    return best.squeeze(-1)


def round_scale(scale: torch.Tensor, spec: QuantSpec, model_dtype: torch.dtype) -> torch.Tensor:
    """Float32 scales, rounded through the model dtype first when the spec asks for it."""
    return scale.to(model_dtype).float() if spec.scale_dtype == "model" else scale


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The float32 weight (N, K) the quantized op computes with for `w` under `spec` (the same
    scales, zero points and codes as `quantize_weight_tensors`, without packing them: the
    searches call it in their inner loops)."""
    codes, scale, zero = _codes(w, spec)
    if spec.dtype == "fp8":
        return codes.float() * scale.float()
    return P.dequantize_weight(codes, scale.float(), zero, spec.bits, op_group_size(spec) or None)


def fake_quantize_activation(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """The activations (n, K) the quantized op computes with, float32. Dynamic specs: the op's
    own per-token quantizer (clip ratio included). Static per-tensor specs: a scale from x's
    own range, chosen as calibration chooses it (`RangeObserver.symmetric_scale` / fp8)."""
    if spec is None:
        return x.float()
    fp8 = spec.dtype == "fp8"
    if spec.dynamic:
        return op_fake_quantize_activation(x, spec.bits, None, fp8=fp8, clip_ratio=spec.clip_ratio)
    lo, hi = x.float().amin(), x.float().amax()
    if fp8:  # static fp8 scales take the whole range
        scale = P.fp8_scale(torch.maximum(-lo, hi))
    else:
        scale, _ = P.choose_qparams(lo * spec.clip_ratio, hi * spec.clip_ratio, spec.bits, symmetric=True)
    return op_fake_quantize_activation(x, spec.bits, scale, fp8=fp8)
