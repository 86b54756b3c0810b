"""Calibration split over two processes (torch.distributed, gloo) gives the tensors one process
gives, up to the order floating-point sums are taken in.

Tolerance: a Hessian summed in another order differs in its last bits, which can move a GPTQ
code across a rounding boundary, and the error feeds every later column and block. So packed
codes may differ in at most 2 % of their bytes, and every floating-point tensor (scales, folded
norms) and the logits by at most 2 % of their largest magnitude. Measured on these models: the
GPTQ, AWQ, SmoothQuant and QuaRot+GPTQ tensors came out identical, GPTAQ's within 1e-6, and
static 8-bit activations with GPTQ W8 moved 1.2 % of code bytes and the logits by 0.75 %.
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qfx
from qfx import distributed
from qfx.cli import main as main_cli
from tests.conftest import tiny_model

RECIPES = ["gptq w4 g32", "gptaq w4 g32", "awq w4 g32", "smoothquant w8 g0 a8", "quarot,gptq w4 g32",
           "gptq w8 g0 a8 a-static"]


def _calib() -> list[torch.Tensor]:
    # 8 samples in 4 batches of 2: each process gets 2 batches; AWQ's search (2 samples here)
    # falls on the first process only, as in one process
    return [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _quantize(recipe: str) -> dict[str, torch.Tensor]:
    model = tiny_model("llama", num_hidden_layers=3)
    q = qfx.quantize(model, recipe.replace("w4 g32", "w4 g32 search2"), calib=_calib(), progress=False)
    with torch.no_grad():
        logits = q(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(99)))
    return {"logits": logits, **{k: v.clone() for k, v in q.state_dict().items()}}


def _worker(rank: int, world: int, rendezvous: str, out: str, recipe: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tensors = _quantize(recipe)
        assert distributed.rank() == rank and distributed.world() == world
        gathered = distributed.gather(tensors)
        if rank == 0:
            assert all(set(g) == set(tensors) for g in gathered)
            different = [k for k in tensors if not all(torch.equal(g[k], tensors[k]) for g in gathered)]
            torch.save({"tensors": tensors, "ranks_differ": different}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_give_the_tensors_of_one(tmp_path, recipe):
    out = str(tmp_path / "two.pt")
    mp.start_processes(_worker, args=(2, str(tmp_path / "rendezvous"), out, recipe), nprocs=2, start_method="spawn")
    two = torch.load(out)
    assert two["ranks_differ"] == []  # every process ends with the same model
    one = _quantize(recipe)
    assert set(one) == set(two["tensors"])
    codes = {k: (a != two["tensors"][k]).float().mean().item() for k, a in one.items() if a.dtype == torch.uint8}
    floats = {k: ((a.float() - two["tensors"][k].float()).abs().max() / a.float().abs().max().clamp_min(1e-12)).item()
              for k, a in one.items() if a.is_floating_point()}
    assert codes and max(codes.values()) <= 0.02, max(codes.items(), key=lambda kv: kv[1])
    assert max(floats.values()) <= 0.02, max(floats.items(), key=lambda kv: kv[1])


def test_without_a_process_group_everything_is_one_process():
    batches = _calib()
    assert distributed.my_batches(batches) == (batches, 0)
    assert (distributed.rank(), distributed.world(), distributed.sum_float(1.5)) == (0, 1, 1.5)
    assert distributed.share({"a": 1}) == {"a": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["in memory", "streamed from disk"])
def test_torchrun_splits_the_cli_and_only_the_first_process_writes(tmp_path, tiny_hf_dir, stream):
    common = ["quantize", "--model", str(tiny_hf_dir), "--method", "gptq", "--w-group", "32", "--seq-len", "32",
              "--calib-samples", "4", "--calib-batch-size", "1", "--device", "cpu", "--quiet", "--json"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "qfx.cli", *common, *(["--stream"] if stream else []),
                          "--output", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["calib_samples"] == 4  # printed once, by the first process
    assert main_cli([*common, "--output", str(tmp_path / "one")]) == 0
    one, two = qfx.load(tmp_path / "one").state_dict(), qfx.load(tmp_path / "two").state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one), [k for k in one if not torch.equal(one[k], two[k])][:3]
