"""Hadamard constructions and the fast transform against dense references."""

import math
import warnings

import pytest
import torch

from qfx.algorithms.hadamard import (hadamard_dense, hadamard_matrix, hadamard_transform, online_factor_changed_since_v1,
                                     online_factors, orthogonal, random_orthogonal)

# the orders real models need after their power-of-two factor (Paley I, Paley II, doubling,
# Goethals-Seidel for 156 and 172)
ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 40, 52, 60, 72, 76, 108, 140, 148, 156, 172, 312, 344]


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 188])
def test_orders_without_a_construction_give_none(n):
    # 3, 6, 10: no Hadamard matrix exists; 188 = 4 x 47 needs a construction not built here
    assert hadamard_matrix(n) is None


@pytest.mark.parametrize("n", [16, 64, 12 * 8, 36 * 16, 20 * 4, 28 * 2, 172 * 4, 156 * 2])
def test_fast_transform_matches_dense_kronecker(n):
    m_mat, p = online_factors(n)
    m = n // p
    ref_matrix = _sylvester(p) / math.sqrt(p)
    if m > 1:
        ref_matrix = torch.kron(hadamard_matrix(m) / math.sqrt(m), ref_matrix)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x), x @ ref_matrix, rtol=0, atol=1e-12)
    d = hadamard_dense(n)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fast_transform_keeps_dtype_and_is_float32_accurate():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    y = hadamard_transform(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x.bfloat16().double() @ hadamard_dense(96)).float(), rtol=1e-2, atol=1e-2)


def test_unbuilt_order_falls_back_to_seeded_orthogonal_with_warning():
    online_factors.cache_clear()
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 47"):
        d = hadamard_dense(47 * 4)
    torch.testing.assert_close(d @ d.T, torch.eye(188, dtype=torch.float64), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online_factors.cache_clear()
        assert torch.equal(hadamard_dense(188), d)  # rebuilt identically: saved models reload exactly


def test_orthogonal_is_a_random_sign_hadamard_and_seeded():
    q = orthogonal(24 * 4, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(96)))
    assert torch.equal(q, orthogonal(96, seed=3)) and not torch.equal(q, orthogonal(96, seed=4))
    with pytest.warns(UserWarning, match="random orthogonal"):
        r = orthogonal(188, seed=0)
    torch.testing.assert_close(r @ r.T, torch.eye(188, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(random_orthogonal(5, 1), random_orthogonal(5, 1))


def test_online_factors_that_changed_since_checkpoint_format_1():
    # format 1 had no Goethals-Seidel matrices: 11008 = 172 x 64 (Llama-2-7B's MLP) and 156 x 8
    # fell back to a random odd factor; 312 = 311 + 1 was one Paley I matrix and is now
    # H_156 (x) H_2 (the larger power-of-two part is preferred), so it changed too
    assert all(online_factor_changed_since_v1(n) for n in (11008, 156 * 8, 312))
    assert not any(online_factor_changed_since_v1(n) for n in (4096, 1536, 576, 188, 14336))
    m_mat, p = online_factors(11008)
    assert p == 64 and torch.equal((m_mat * math.sqrt(172)).abs(), torch.ones(172, 172, dtype=torch.float64))
