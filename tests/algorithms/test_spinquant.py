"""SpinQuant: Cayley steps stay orthogonal and descend; learned rotations lower the quantized loss."""

import pytest
import torch

import qfx
from qfx.algorithms.spinquant import cayley_step
from qfx.learn_rotations import learn_rotations
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
    assert Recipe.parse("spinquant w4 g-1 a4 spin-batch4").spinquant.batch == 4
    with pytest.raises(qfx.ConfigError, match="spinquant.batch=0"):
        Recipe.parse("spinquant w4 g-1 a4 spin-batch0")


def test_weights_are_fake_quantized_while_learning_only_when_rtn_chooses_them():
    # RTN-fake-quantized weights when RTN chooses the final weights; full precision when a
    # calibrated method (GPTQ, GPTAQ) chooses them after learning, so those two learn alike.
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))

    def learn(recipe):
        return learn_rotations(model, recipe, ids.split(1), steps=3, progress=False)["R1"]

    gptq, gptaq, rtn = learn("spinquant,gptq w4 g-1 a4"), learn("spinquant,gptaq w4 g-1 a4"), learn("spinquant w4 g-1 a4")
    torch.testing.assert_close(gptq, gptaq, rtol=0, atol=0)
    assert not torch.allclose(gptq, rtn, rtol=0, atol=1e-4)


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
    from qfx.algorithms.spinquant import LsqActivation as _LsqActivation
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
    from qfx.algorithms.spinquant import LsqActivation as _LsqActivation

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
