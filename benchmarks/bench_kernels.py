"""Kernel benchmark: qfx's Triton GEMMs against cuBLAS bf16, torch._int_mm, torch._scaled_mm, torchao int4
(each packing format that runs here), PyTorch's tinygemm (torch._weight_int4pack_mm), and the roofline, on Llama-3-8B and Llama-3.2-1B linear shapes (CUDA only).

    python benchmarks/bench_kernels.py --out benchmarks/results

Method: random weights and activations (never zeros); each kernel is first checked against its
plain-PyTorch reference at the benchmarked shape, and a kernel that fails the check gets no
speed. Timing: one CUDA graph holding `copies` calls, each on its own copy of the weights so
that the set exceeds L2 (cold weights, as in a model where every layer's weights are new);
the graph is replayed >= 10 times and the median replay time, divided by `copies`, is the time
per call. qfx W8A8 / FP8 / W4A8 times include the per-token activation quantization;
torch._int_mm and torch._scaled_mm times are the GEMM alone on pre-quantized activations.
Formats ending in "_had" read x @ H_K (QuaRot's online rotation) rotated and quantized in one
pass before the GEMM; their peers are the same GEMM without the rotation (the overhead is
time / that time - 1) and the rotation as the reference op followed by the GEMM (unfused).
Roofline: bytes a call must move (weights with scales and zeros, x, y) over the copy bandwidth
measured in this run, and FLOPs over the matching tensor-core rate measured in this run (bf16
for weight-only; fp8 for fp8; for int8 the larger of torch._int_mm's and the fp8 rate, since
Hopper's int8 and fp8 peaks are equal and _int_mm reaches less); the larger of the two times is
the floor, fraction = floor / time.
Pass peers, where the GEMM reads quantized activations: "quant_pass" (W8A8 / FP8 at M >= 256) is
the per-token quantization pass alone, "rotation_pass" (rotated formats) the rotate-and-quantize
pass alone; the rest of the qfx time is the GEMM. They say how much of a ratio target is left
to the GEMM.
Read floor (M <= 16 rows, peer "read"): the time of a kernel that only reads as many bytes as
the call's weights (with scales and zeros) from cold copies, in the same kind of graph, the
fastest of a few grid and block sizes. Unlike the roofline it includes what any kernel of
that size pays besides streaming (launch, ramp-up, the last wave), so no GEMM of these weights
is expected below it, and cuBLAS bf16 time / the read floor of a format's bytes bounds the
ratio a decode kernel of that format can reach here.
Writes kernels.json (a list of rows) and kernels.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qfx.config import QuantSpec, weight_spec  # noqa: E402
from qfx.lowering.kernels import act_quant_gemm, hadamard_rows, tuning, wint_a16  # noqa: E402
from qfx.ops import hadamard_ref  # noqa: E402
from qfx.lowering.kernels.layout import KernelWeight, kernel_weight  # noqa: E402
from qfx.quantizer import op_group_size, quantize_weight_tensors  # noqa: E402
from results_notes import write_keeping_notes  # noqa: E402

SHAPES = {  # name: (N, K) of y = x W^T
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
}
FORMATS = {  # name: (weight spec, activation bits)
    "w4a16_g128": (weight_spec(4, 128, symmetric=False), 16),
    "w8a8": (weight_spec(8, 0, symmetric=True), 8),
    "fp8": (QuantSpec(bits=8, dtype="fp8", granularity="channel", group_size=None), 8),
    "w4a8_g128": (weight_spec(4, 128, symmetric=True), 8),
}
ROTATED = ("w8a8_had", "w4a8_g128_had", "fp8_had")  # FORMATS[name without "_had"], with the online rotation
L2_COLD_BYTES = 256 << 20  # the weight copies of one timing graph add up to at least this (H100 L2: 50 MB)


def graph_time_us(calls, replays: int = 15) -> float:
    """Median time per call of `calls` (zero-arg callables), captured in one CUDA graph; the
    callers make the L2 cold by rotating weight copies across the calls."""
    return tuning.graph_time_ms(calls, None, replays) * 1e3 / len(calls)


def n_copies(nbytes: int) -> int:
    return max(2, min(64, math.ceil(L2_COLD_BYTES / nbytes)))


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr):
    """Reads int32 words src[0:n] (grid-stride, BLOCK per step) and writes one word per program."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n, other=0)
    tl.store(out + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def read_floor_us(nbytes: int) -> float:
    """Fastest time (µs) to read `nbytes` from cold memory in one kernel (see the module docstring)."""
    n = triton.cdiv(nbytes, 4)
    bufs = [torch.randint(-2**31, 2**31 - 1, (n,), device="cuda", dtype=torch.int32) for _ in range(n_copies(nbytes))]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * 8, device="cuda", dtype=torch.int32)
    best = float("inf")
    for programs in (sms, 2 * sms, 4 * sms, 8 * sms):
        for block, warps in ((1024, 4), (4096, 8)):
            grid = (min(programs, triton.cdiv(n, block)),)
            best = min(best, graph_time_us([lambda b=b: _read_kernel[grid](b, out, n, BLOCK=block, num_warps=warps)
                                            for b in bufs]))
    return best


def ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes/s) and bf16 / int8 / fp8 dense matmul rates (FLOP/s) measured here."""
    out = {}
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    out["bandwidth"] = 2 * src.numel() * 4 / (graph_time_us([lambda: dst.copy_(src)] * 4) * 1e-6)
    del src, dst
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out["bf16"] = 2 * n**3 / (graph_time_us([lambda: a @ b] * 4) * 1e-6)
    ai = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8)
    bi = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8).T
    out["int8"] = 2 * n**3 / (graph_time_us([lambda: torch._int_mm(ai, bi)] * 4) * 1e-6)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T
    one = torch.ones((), device="cuda")
    out["fp8"] = 2 * n**3 / (graph_time_us([lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)] * 4)
                             * 1e-6)
    # Hopper's int8 and fp8 tensor-core peaks are equal; torch._int_mm reaches less than its fp8 GEMM
    out["int8"] = max(out["int8"], out["fp8"])
    return out


def kw_bytes(kw: KernelWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (kw.data, kw.scale, kw.zero) if t is not None)


def clone_kw(kw: KernelWeight) -> KernelWeight:
    return KernelWeight(kw.layout, kw.data.clone(), kw.scale.clone(), None if kw.zero is None else kw.zero.clone(),
                        kw.bits, kw.group, kw.n, kw.k)


def qfx_kernel(fmt: str, w: torch.Tensor):
    """(kernel weight, run(x, kw), reference(x, kw)) for one format."""
    base = fmt.removesuffix("_had")
    spec, a_bits = FORMATS[base]
    t = quantize_weight_tensors(w, spec)
    kw = kernel_weight(t["qweight"], t["w_scale"], t.get("w_zero"), spec.bits, op_group_size(spec), w.shape[1],
                       int8_rows=base == "w8a8")
    if a_bits == 16:
        return kw, wint_a16.wint_a16_linear, wint_a16.wint_a16_ref
    if fmt != base:
        mix = hadamard_rows.mix_factor(w.shape[1])
        mix = None if mix is None else mix.to(w.device)
        return (kw, lambda x, c: act_quant_gemm.act_quant_linear(x, c, hadamard=True, mix=mix),
                lambda x, c: act_quant_gemm.act_quant_ref(x, c, hadamard=True))
    return kw, act_quant_gemm.act_quant_linear, act_quant_gemm.act_quant_ref


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


TORCHAO_INT4_FORMATS = ("preshuffled", "plain", "tile_packed_to_4d")  # torchao's H100 advice first


def torchao_int4(w: torch.Tensor, group: int) -> tuple[list[tuple[str, torch.nn.Module]], list[str]]:
    """torchao's int4 weight-only linears, one per packing format that runs here:
    ([(label, module)], notes). "preshuffled" and "plain" run fbgemm's Hopper kernels (they need
    fbgemm-gpu-genai), "tile_packed_to_4d" runs tinygemm."""
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        return [], [f"torchao unavailable: {type(e).__name__}: {e}"]
    found, notes = [], []
    for fmt in TORCHAO_INT4_FORMATS:
        try:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            quantize_(lin, Int4WeightOnlyConfig(group_size=group, int4_packing_format=fmt))
            x = torch.randn(16, w.shape[1], device="cuda", dtype=torch.bfloat16)
            err = rel_err(lin(x), F.linear(x, w))
            if not err < 0.1:  # 4-bit weights: a working linear is within a few percent
                raise AssertionError(f"rel err {err:.3g} against the bf16 linear")
            found.append((f"torchao_{fmt}", lin))
            notes.append(f"torchao {torchao.__version__} Int4WeightOnlyConfig(int4_packing_format={fmt!r})")
        except Exception as e:  # noqa: BLE001
            notes.append(f"torchao int4 {fmt} did not run: {type(e).__name__}: {str(e)[:120]}")
    return found, notes


def tinygemm_int4(w: torch.Tensor, group: int):
    """PyTorch's built-in tinygemm: (packed weight, scales-and-zeros, reference W) for
    `torch._weight_int4pack_mm` (uint4 codes two per byte, then `_convert_weight_to_int4pack`'s
    tensor-core tiling with innerKTiles = 8; bf16 scale and float zero per group and column:
    w = (q - 8) s + z)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = lo + 8 * scale
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (K / group, N, 2)
    ref = ((q.reshape(n, k // group, group) - 8) * sz[..., 0].T.float()[..., None]
           + sz[..., 1].T.float()[..., None]).reshape(n, k)
    return packed, sz, ref


def picked_configs(m: int, n: int, k: int) -> list[str]:
    """The tuner's picks for this M bucket and shape (which variant and tile won)."""
    table = tuning._load(tuning._cache_file())
    return [f"{key.split('/')[0]} {tuple(v)}" for key, v in table.items()
            if key.split("/")[1:4] == [str(tuning.m_bucket(m)), str(n), str(k)]]


def bench_shape(name: str, n: int, k: int, ms: list[int], formats: list[str], roof: dict, notes: set) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(hash(name) % 2**31)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    rows = []
    w_copies = [w] + [w.clone() for _ in range(n_copies(w.numel() * 2) - 1)]
    ao, ao_notes = torchao_int4(w, 128) if "w4a16_g128" in formats else ([], [])
    notes.update(ao_notes)
    import copy

    ao_copies = {label: [lin] + [copy.deepcopy(lin) for _ in range(n_copies(n * k // 2) - 1)] for label, lin in ao}
    tiny = None
    if "w4a16_g128" in formats:
        try:
            packed, sz, tiny_ref = tinygemm_int4(w, 128)
            xt = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
            err = rel_err(torch._weight_int4pack_mm(xt, packed, 128, sz), F.linear(xt, tiny_ref.to(torch.bfloat16)))
            if not err < 1e-2:
                raise AssertionError(f"rel err {err:.3g} against its dequantized weights")
            tiny = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n_copies(n * k // 2) - 1)]
            notes.add("tinygemm: torch._weight_int4pack_mm, innerKTiles 8, g128")
        except Exception as e:  # noqa: BLE001
            notes.add(f"tinygemm did not run: {type(e).__name__}: {str(e)[:120]}")
    for fmt in formats:
        try:
            kw, run, ref = qfx_kernel(fmt, w)
        except Exception as e:  # noqa: BLE001
            notes.add(f"{fmt} {name}: no kernel weight: {e}")
            continue
        kws = [kw] + [clone_kw(kw) for _ in range(n_copies(kw_bytes(kw)) - 1)]
        floor = read_floor_us(kw_bytes(kw)) if min(ms) <= 16 else None
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            row = {"format": fmt, "shape": name, "m": m, "n": n, "k": k}
            try:
                err = rel_err(run(x, kw), ref(x, kw))
                row["check_rel_err"] = err
                if not err < 1e-2:
                    raise AssertionError(f"kernel disagrees with its reference: rel err {err:.3g}")
                row["qfx_us"] = graph_time_us([lambda c=c: run(x, c) for c in kws])
                row["configs"] = picked_configs(m, n, k)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            row["cublas_bf16_us"] = graph_time_us([lambda c=c: F.linear(x, c) for c in w_copies])
            peers = {}
            if m <= 16:
                peers["read_us"] = floor
            if fmt == "w4a16_g128":
                for label, copies in ao_copies.items():
                    peers[f"{label}_us"] = graph_time_us([lambda c=c: c(x) for c in copies])
                if tiny is not None:
                    peers["tinygemm_us"] = graph_time_us([lambda c=c: torch._weight_int4pack_mm(x, c[0], 128, c[1])
                                                          for c in tiny])
            if fmt == "w8a8" and m > 16:  # torch._int_mm needs M > 16
                xi = torch.randint(-127, 127, (m, k), device="cuda", dtype=torch.int8)
                wis = [kk.data.T for kk in kws]
                peers["int_mm_us"] = graph_time_us([lambda c=c: torch._int_mm(xi, c) for c in wis])
            if fmt == "fp8":
                x8 = x.to(torch.float8_e4m3fn)
                sa = torch.rand(m, 1, device="cuda") + 0.5
                peers["scaled_mm_fp8_rowwise_us"] = graph_time_us([
                    lambda c=c: torch._scaled_mm(x8, c.data.T, sa, c.scale, out_dtype=torch.bfloat16) for c in kws])
            if fmt in ("w8a8", "fp8") and m >= 256:
                peers["quant_pass_us"] = graph_time_us([lambda: act_quant_gemm.quantize_rows(x, fmt == "fp8")] * 8)
            if fmt in ROTATED:
                mix = hadamard_rows.mix_factor(k)
                mix = None if mix is None else mix.cuda()
                peers["rotation_pass_us"] = graph_time_us(
                    [lambda: hadamard_rows.hadamard_quantize_rows(x, mix, fmt.startswith("fp8"))] * 8)
                peers["no_rotation_us"] = graph_time_us([lambda c=c: act_quant_gemm.act_quant_linear(x, c) for c in kws])
                peers["unfused_us"] = graph_time_us([lambda c=c: act_quant_gemm.act_quant_linear(hadamard_ref(x), c)
                                                     for c in kws])
                if "qfx_us" in row:
                    row["rotation_overhead"] = row["qfx_us"] / peers["no_rotation_us"] - 1
            row["peers"] = peers
            moved = kw_bytes(kw) + m * k * 2 + m * n * 2
            rate = roof["bf16" if "a16" in fmt else "fp8" if fmt.startswith("fp8") else "int8"]
            row["roofline_us"] = max(moved / roof["bandwidth"], 2 * m * n * k / rate) * 1e6
            if "qfx_us" in row:
                row["ratio"] = row["cublas_bf16_us"] / row["qfx_us"]
                row["roofline_fraction"] = row["roofline_us"] / row["qfx_us"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| format | shape | M | N | K | qfx µs | cuBLAS bf16 µs | ratio | peers µs | roofline µs | of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peers = ", ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in r.get("peers", {}).items()) or "-"
        q = f"{r['qfx_us']:.1f}" if "qfx_us" in r else f"failed: {r.get('error', '')[:60]}"
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "-"
        frac = f"{r['roofline_fraction']:.0%}" if "roofline_fraction" in r else "-"
        lines.append(f"| {r['format']} | {r['shape']} | {r['m']} | {r['n']} | {r['k']} | {q} | "
                     f"{r['cublas_bf16_us']:.1f} | {ratio} | {peers} | {r['roofline_us']:.1f} | {frac} |")
    rotated = [r for r in rows if "rotation_overhead" in r]
    if rotated:
        lines += ["", "Online rotation (x @ H_K) fused with activation quantization, against the same GEMM "
                  "without it and against the reference rotation op followed by the GEMM:", "",
                  "| format | shape | M | K | with rotation µs | without µs | overhead | rotation pass µs | unfused µs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rotated:
            p = r["peers"]
            rot_pass = f"{p['rotation_pass_us']:.1f}" if "rotation_pass_us" in p else "-"
            lines.append(f"| {r['format']} | {r['shape']} | {r['m']} | {r['k']} | {r['qfx_us']:.1f} | "
                         f"{p['no_rotation_us']:.1f} | {r['rotation_overhead']:+.1%} | {rot_pass} | "
                         f"{p['unfused_us']:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """kernels.json (rows), kernels_meta.json and kernels.md; the "## Notes" section of an existing
    kernels.md (written by hand about its run) is kept."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps([{**r, "device": meta["device"]} for r in rows], indent=1))
    (out / "kernels_meta.json").write_text(json.dumps(meta, indent=1))
    v = meta["versions"]
    header = (f"# Kernel benchmark\n\n{meta['date']}, {meta['device']}, torch {v['torch']}, triton "
              f"{v['triton']}, CUDA {v['cuda']}.\n\nCommand: `{meta['command']}`\n\n"
              f"Ceilings measured in this run: copy {meta['ceilings']['copy_bandwidth_GBps']:.0f} GB/s, "
              + ", ".join(f"{k.removesuffix('_TFLOPs')} {v:.0f} TFLOP/s" for k, v in meta["ceilings"].items()
                          if k.endswith("TFLOPs"))
              + ".\n\nratio = cuBLAS bf16 time / qfx time. qfx W8A8/FP8/W4A8 include per-token activation "
              "quantization; int_mm and scaled_mm are the GEMM alone. Notes: " + "; ".join(meta["notes"]))
    write_keeping_notes(out / "kernels.md", markdown(rows, header))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--m", default="1,16,64,256,2048")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma list of " + ", ".join([*FORMATS, *ROTATED]))
    ap.add_argument("--rewrite", action="store_true",
                    help="rewrite kernels.md from the kernels.json and kernels_meta.json under --out (no timing)")
    args = ap.parse_args(argv)
    if args.rewrite:
        out = Path(args.out)
        rows = json.loads((out / "kernels.json").read_text())
        write_results(out, rows, json.loads((out / "kernels_meta.json").read_text()))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py times CUDA kernels; no CUDA device here")

    ms = [int(m) for m in args.m.split(",")]
    formats = args.formats.split(",")
    roof = ceilings()
    print(json.dumps(roof), flush=True)
    notes: set[str] = set()
    rows = []
    for name in args.shapes.split(","):  # results rewritten after each shape: a run cut short keeps them
        rows += bench_shape(name, *SHAPES[name], ms, formats, roof, notes)
        write_results(Path(args.out), rows, run_meta(roof, notes))
    return 0


def run_meta(roof: dict, notes: set) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "command": "python " + " ".join(sys.argv),
        "ceilings": {"copy_bandwidth_GBps": roof["bandwidth"] / 1e9,
                     **{f"{k}_TFLOPs": v / 1e12 for k, v in roof.items() if k != "bandwidth"}},
        "notes": sorted(notes),
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
