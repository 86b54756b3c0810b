"""Hadamard constructions and the fast transform against dense references."""

import math
import warnings

import pytest
import torch

from qfx.algorithms.hadamard import (hadamard_dense, hadamard_matrix, hadamard_transform, online_factors,
                                     orthogonal, random_orthogonal)

# the orders real models need after their power-of-two factor (Paley I, Paley II, doubling)
ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 40, 52, 60, 72, 76, 108, 140, 148]


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


@pytest.mark.parametrize("n", [3, 6, 10, 156, 172])
def test_orders_without_a_construction_give_none(n):
    # 3, 6, 10: no Hadamard matrix exists; 156 and 172 need constructions not built here
    assert hadamard_matrix(n) is None


@pytest.mark.parametrize("n", [16, 64, 12 * 8, 36 * 16, 20 * 4, 28 * 2])
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
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 43"):
        d = hadamard_dense(43 * 4)
    torch.testing.assert_close(d @ d.T, torch.eye(172, dtype=torch.float64), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online_factors.cache_clear()
        assert torch.equal(hadamard_dense(172), d)  # rebuilt identically: saved models reload exactly


def test_orthogonal_is_a_random_sign_hadamard_and_seeded():
    q = orthogonal(24 * 4, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(96)))
    assert torch.equal(q, orthogonal(96, seed=3)) and not torch.equal(q, orthogonal(96, seed=4))
    with pytest.warns(UserWarning, match="random orthogonal"):
        r = orthogonal(156, seed=0)
    torch.testing.assert_close(r @ r.T, torch.eye(156, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(random_orthogonal(5, 1), random_orthogonal(5, 1))
