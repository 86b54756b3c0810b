"""SpinQuant: Cayley steps stay orthogonal and descend; learned rotations lower the quantized loss."""

import pytest
import torch

import qfx
from qfx.algorithms.spinquant import cayley_step, learn_rotations
from qfx.config import Recipe
from tests.conftest import tiny_model


def test_cayley_step_is_orthogonal_and_descends_a_quadratic():
    g = torch.Generator().manual_seed(0)
    target, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    r = torch.eye(8, dtype=torch.float64)
    losses = []
    for _ in range(50):  # minimise ||R - T||^2 over orthogonal R: gradient 2 (R - T)
        losses.append(((r - target) ** 2).sum().item())
        r = cayley_step(r, 2 * (r - target), lr=0.1)
        torch.testing.assert_close(r @ r.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert losses[-1] < 0.5 * losses[0] and all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))


def _loss(gm, ids):
    out = gm(ids)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def test_learned_rotations_lower_the_quantized_loss_on_their_data():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.parse("spinquant w4 g-1 a4")
    rotations = learn_rotations(model, "spinquant w4 g-1 a4", ids.split(1), steps=30, lr=1.5, progress=False)
    assert set(rotations) == {"R1", "R2.model.layers.0.self_attn.o_proj", "R2.model.layers.1.self_attn.o_proj"}
    for r in rotations.values():
        torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0]), rtol=0, atol=1e-5)
    quarot = _loss(qfx.quantize(model, "quarot w4 g-1 a4", progress=False), ids)  # same starting rotations
    spin = _loss(qfx.convert(qfx.prepare(model, recipe, rotations=rotations)), ids)
    assert spin < quarot
    via_quantize = qfx.quantize(model, "spinquant w4 g-1 a4 spin-steps30", calib=ids.split(1), progress=False)
    assert _loss(via_quantize, ids) == pytest.approx(spin, rel=1e-6)  # deterministic


def test_spinquant_without_data_or_rotations_is_refused():
    model = tiny_model("llama")
    with pytest.raises(qfx.ConfigError, match="spinquant learns its rotations from calibration data"):
        qfx.quantize(model, "spinquant w4 g-1 a4", progress=False)
    with pytest.raises(ValueError, match="spinquant learns its rotations"):
        qfx.prepare(model, "spinquant w4 g-1 a4")


def test_a_step_over_several_batches_equals_one_step_over_their_concatenation():
    # the loss is a mean over tokens: the average of two equal-sized batches' gradients is the
    # gradient of the two stacked into one batch. Weights only (fake-quantized by RTN): with
    # 4-bit activations, float32 rounding that differs between batch shapes flips some codes.
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    recipe = "spinquant w4 g-1"
    split = learn_rotations(model, recipe, ids.split(1), steps=2, progress=False, batches_per_step=2)
    stacked = learn_rotations(model, recipe, [ids], steps=2, progress=False)
    one_each = learn_rotations(model, recipe, ids.split(1), steps=2, progress=False)
    for k in split:
        torch.testing.assert_close(split[k], stacked[k], rtol=0, atol=1e-6)
    assert not torch.allclose(split["R1"], one_each["R1"], rtol=0, atol=1e-5)
    assert Recipe.parse("spinquant w4 g-1 a4 spin-batch4").spin_batch == 4
    with pytest.raises(qfx.ConfigError, match="spin_batch=0"):
        Recipe.parse("spinquant w4 g-1 a4 spin-batch0")


def test_spin_weights_chooses_what_the_weights_are_while_learning():
    # auto: RTN-fake-quantized weights when RTN chooses the final weights, full precision when
    # GPTQ chooses them later; rtn / float force one or the other.
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))

    def learn(recipe):
        return learn_rotations(model, recipe, ids.split(1), steps=3, progress=False)["R1"]

    gptq_auto, gptq_float = learn("spinquant,gptq w4 g-1 a4"), learn("spinquant,gptq w4 g-1 a4 spin-weights-float")
    gptq_rtn, rtn_auto = learn("spinquant,gptq w4 g-1 a4 spin-weights-rtn"), learn("spinquant w4 g-1 a4")
    torch.testing.assert_close(gptq_auto, gptq_float, rtol=0, atol=0)
    torch.testing.assert_close(gptq_rtn, rtn_auto, rtol=0, atol=0)
    assert not torch.allclose(gptq_float, gptq_rtn, rtol=0, atol=1e-4)
    assert Recipe.parse("spinquant w4 spin-weights-rtn").spin_weights == "rtn"
    with pytest.raises(qfx.ConfigError, match="spin_weights='fp'"):
        Recipe(methods=("spinquant",), spin_weights="fp")


def test_linear_schedule_decays_the_step_size():
    # step t of T moves by at most lr (1 - t / T): the first step is the constant schedule's,
    # later ones are shorter. A small lr keeps it below the 1 / ||A||_1 cap, so it decides.
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))

    def learn(recipe, steps):
        return learn_rotations(model, recipe, ids.split(1), steps=steps, lr=1e-3, progress=False)["R1"]

    one_linear, one_constant = learn("spinquant w4 g-1 a4 spin-linear", 1), learn("spinquant w4 g-1 a4", 1)
    torch.testing.assert_close(one_linear, one_constant, rtol=0, atol=0)
    start = learn_rotations(model, "spinquant w4 g-1 a4", ids.split(1), steps=1, lr=1e-12, progress=False)["R1"]
    linear, constant = learn("spinquant w4 g-1 a4 spin-linear", 4), learn("spinquant w4 g-1 a4", 4)
    assert 0 < (linear - start).norm() < (constant - start).norm()
    assert Recipe.parse("spinquant w4 spin-linear").spin_schedule == "linear"
    with pytest.raises(qfx.ConfigError, match="spin_schedule='cosine'"):
        Recipe(methods=("spinquant",), spin_schedule="cosine")


def _lsq_by_autograd(x, clip):
    """The same estimator from plain ops: rounding straight-through, the scale differentiated."""
    s = torch.clamp(x.float().abs().amax(-1, keepdim=True) * clip / 7.5, min=1e-12)
    u = x.float() / s
    return torch.clamp(u + (torch.round(u) - u).detach(), -8, 7) * s


@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_lsq_activation_quantizes_as_the_op_and_differentiates_the_scale(clip):
    # forward: the codes and scales of `quantize_per_token`, bit for bit. Backward for a loss
    # sum(c * xq): c straight through where the code is in range, plus, at each token's largest
    # |x|, sign(x) * clip / 7.5 * sum_i c_i (q_i - x_i / s) (the scale's share; int4:
    # s = clip max|x| / 7.5, and q_i alone where the code is clamped). The hand-written backward
    # also matches autograd through plain ops.
    from qfx.algorithms.spinquant import _LsqActivation
    from qfx.ops import fake_quantize_activation

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 40, generator=g, dtype=torch.float32)
    x[2, 5] = 0.0
    c = torch.randn(6, 40, generator=g, dtype=torch.float32)
    leaf = x.clone().requires_grad_()
    xq = _LsqActivation.apply(leaf, 4, clip)
    torch.testing.assert_close(xq, fake_quantize_activation(x, 4, None, fp8=False, clip_ratio=clip), rtol=0, atol=0)
    (xq * c).sum().backward()

    s = clip * x.abs().amax(-1, keepdim=True) / 7.5
    u = x / s
    q = torch.clamp(torch.round(u), -8, 7)
    inside = (torch.round(u) >= -8) & (torch.round(u) <= 7)  # clamp passes the gradient only for codes in range
    expected = torch.where(inside, c, torch.zeros_like(c))
    d_scale = (c * torch.where(inside, q - u, q)).sum(-1)  # d(s * clamp(u))/ds, u = x / s
    top = x.abs().argmax(-1)
    rows = torch.arange(6)
    expected[rows, top] += torch.sign(x[rows, top]) * clip / 7.5 * d_scale
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-6)

    ref_leaf = x.clone().requires_grad_()
    (_lsq_by_autograd(ref_leaf, clip) * c).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


def test_lsq_activation_takes_bf16_and_all_zero_tokens():
    # bf16 in (as the model's activations are), float32 out, gradient back in bf16; a token of
    # zeros has a clamped scale, which passes no gradient (autograd's clamp does the same).
    from qfx.algorithms.spinquant import _LsqActivation

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    x[1] = 0
    c = torch.randn(4, 64, generator=g)
    mine, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = _LsqActivation.apply(mine, 4, 1.0)
    assert out.dtype == torch.float32
    (out * c).sum().backward()
    (_lsq_by_autograd(ref, 1.0) * c).sum().backward()
    assert mine.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(mine.grad[1], c[1].to(torch.bfloat16), rtol=0, atol=0)


def test_spin_estimator_chooses_the_activation_gradient():
    # lsq (default) and ste see the same forward loss but different gradients, so one step
    # lands on different rotations; without activation quantization they are the same.
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(5))

    def learn(recipe):
        return learn_rotations(model, recipe, ids.split(1), steps=1, progress=False)["R1"]

    assert Recipe.parse("spinquant w4 g-1 a4").spin_estimator == "lsq"
    assert Recipe.parse("spinquant w4 g-1 a4 spin-ste").spin_estimator == "ste"
    assert not torch.allclose(learn("spinquant w4 g-1 a4"), learn("spinquant w4 g-1 a4 spin-ste"), rtol=0, atol=1e-4)
    torch.testing.assert_close(learn("spinquant w4 g-1"), learn("spinquant w4 g-1 spin-ste"), rtol=0, atol=0)
    with pytest.raises(qfx.ConfigError, match="spin_estimator='lsd'"):
        Recipe(methods=("spinquant",), spin_estimator="lsd")
