"""Hadamard and orthogonal matrices for rotations, and the fast transform for online ones.

A Hadamard matrix H (n x n, entries +-1, H H^T = n I) exists only for n = 1, 2 or a multiple
of 4. We build one for n from:
- Paley I: q + 1 for a prime power q = 3 (mod 4) (12 = 11 + 1, 20, 60, 108, 140, ...);
- Paley II: 2 (q + 1) for a prime power q = 1 (mod 4) (28 from 13, 36 from 17, 52 from 25, ...);
- Sylvester doubling [[H, H], [H, -H]] of a smaller one (40 = 2 x 20, 576 = 8 x 72, ...);
- the Goethals-Seidel array of four circulant +-1 matrices, for 156 = 4 x 39 and 172 = 4 x 43
  (172 x 64 = 11008 is Llama-2-7B's MLP width). Their first rows are stored below; they were
  found by simulated annealing on the sum of the four sequences' squared periodic
  autocorrelations (zero at every non-zero shift is what the array needs), and the tests check
  H H^T = n I.
Orders these do not reach have no matrix here; `orthogonal(n)` then uses a seeded random
orthogonal matrix instead, with a warning, which rotates just as exactly but spreads outliers
less evenly.

The online transform (a runtime op in rotated graphs) multiplies by H_m (x) H_(2^k) / sqrt(n)
for n = m 2^k: a dense m x m product and k butterfly passes, O(n (m + log n)) per row instead
of the O(n^2) of a dense matmul.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _irreducible(p: int, k: int) -> list[int]:
    """Coefficients (low to high, monic) of an irreducible polynomial of degree k over GF(p)."""
    if k == 1:
        return [0, 1]
    if k > 3:  # a root-free quartic may still factor into quadratics; not needed for our orders
        raise ValueError(f"GF({p}^{k}) is not supported")
    for code in range(p**k):
        coeffs = [(code // p**i) % p for i in range(k)] + [1]
        if all(sum(c * x**i for i, c in enumerate(coeffs)) % p for x in range(p)):
            return coeffs  # degree <= 3 with no root is irreducible
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


def _field(q: int) -> tuple[list[tuple[int, ...]], set[tuple[int, ...]], int]:
    """Elements of GF(q) as coefficient tuples, the set of non-zero squares, and p."""
    p, k = _prime_power(q)
    mod = _irreducible(p, k)
    elements = [tuple((code // p**i) % p for i in range(k)) for code in range(q)]

    def mul(a, b):
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                prod[i + j] = (prod[i + j] + x * y) % p
        for d in range(2 * k - 2, k - 1, -1):  # reduce by the monic modulus
            c = prod[d]
            if c:
                for i in range(k + 1):
                    prod[d - k + i] = (prod[d - k + i] - c * mod[i]) % p
        return tuple(prod[:k])

    zero = elements[0]
    squares = {mul(a, a) for a in elements if a != zero}
    return elements, squares, p


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(a_i - a_j), the quadratic character of GF(q) (0 on the diagonal)."""
    elements, squares, p = _field(q)
    zero = elements[0]
    out = torch.zeros(q, q, dtype=torch.float64)
    for i, a in enumerate(elements):
        for j, b in enumerate(elements):
            d = tuple((x - y) % p for x, y in zip(a, b))
            out[i, j] = 0 if d == zero else (1 if d in squares else -1)
    return out


def _paley_1(q: int) -> torch.Tensor:
    """Order q + 1, q = 3 (mod 4): I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley_2(q: int) -> torch.Tensor:
    """Order 2 (q + 1), q = 1 (mod 4): the conference matrix C = [[0, 1^T], [1, Q]] expanded,
    0 -> [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


# first rows of circulant A, B, C, D with sum of periodic autocorrelations 0 at every shift != 0
_GOETHALS_SEIDEL = {
    39: (
        "+-+-++++-+-+-++---++-+---+----++--++-++",
        "++++---+++-++-+++-+++++-------++-+--+++",
        "--+-+---+++++-+---++---+---+-+---+-++-+",
        "+--+----+--+++--+--+--+-++---+-----+++-",
    ),
    43: (
        "--------+-++-+-+-+++-++--+--+----+--+++---+",
        "-+++++-+++--+-+++---+-+--+---+-+----+--+-+-",
        "+---+++++-+--+--+++++-++---++-+++--+++++-+-",
        "--++--+--++--++++-+----++-+-+-+++++----++--",
    ),
}


def _circulant(signs: str) -> torch.Tensor:
    """C[i, j] = a[(j - i) mod n] for the +-1 sequence a written as '+' / '-'."""
    a = torch.tensor([1.0 if c == "+" else -1.0 for c in signs], dtype=torch.float64)
    n = a.numel()
    return a[(torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n]


def _goethals_seidel(n: int) -> torch.Tensor:
    """Order 4n from circulant A, B, C, D with A A^T + B B^T + C C^T + D D^T = 4n I:
    [[A, BR, CR, DR], [-BR, A, D^T R, -C^T R], [-CR, -D^T R, A, B^T R], [-DR, C^T R, -B^T R, A]],
    R the back-diagonal permutation."""
    a, b, c, d = (_circulant(s) for s in _GOETHALS_SEIDEL[n])
    r = torch.eye(n, dtype=torch.float64).flip(1)
    rows = [[a, b @ r, c @ r, d @ r], [-b @ r, a, d.T @ r, -c.T @ r], [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a]]
    return torch.cat([torch.cat(row, 1) for row in rows], 0)


@functools.lru_cache(maxsize=None)
def _hadamard(n: int, goethals_seidel: bool = True) -> torch.Tensor | None:
    """`goethals_seidel=False`: the constructions of checkpoint format 1 only (see
    `online_factor_changed_since_v1`)."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    if n & (n - 1) == 0:  # a power of two: Sylvester
        h = _hadamard(n // 2, goethals_seidel)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    pp = _prime_power(n - 1)
    if pp is not None and (n - 1) % 4 == 3 and pp[1] <= 3:
        return _paley_1(n - 1)
    pp = _prime_power(n // 2 - 1)
    if pp is not None and (n // 2 - 1) % 4 == 1 and pp[1] <= 3:
        return _paley_2(n // 2 - 1)
    if goethals_seidel and n // 4 in _GOETHALS_SEIDEL:
        return _goethals_seidel(n // 4)
    h = _hadamard(n // 2, goethals_seidel)
    if h is not None:
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (float64, entries +-1), or None when none is constructed."""
    if n < 1:
        raise ValueError(f"hadamard_matrix: order {n} must be positive")
    h = _hadamard(n)
    return None if h is None else h.clone()


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix (n x n, float64), Haar-distributed, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # fix the signs so the distribution is uniform


@functools.lru_cache(maxsize=None)
def online_factors(n: int) -> tuple[torch.Tensor | None, int]:
    """(M, p) with n = m * p, p a power of two and M (m x m, float64) orthogonal:
    H_m / sqrt(m) when a Hadamard matrix of order m exists, else a fixed random orthogonal
    matrix (seeded by n, so every run builds the same one). M is None when m = 1."""
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1:
            return None, n
        h = _hadamard(m)
        if h is not None:
            return h / math.sqrt(m), p
        p //= 2
    m, p = n // (n & -n), n & -n
    warnings.warn(f"no Hadamard matrix of order {m} (for a rotation of size {n}) is built here; "
                  f"using a random orthogonal {m} x {m} factor instead", stacklevel=3)
    return random_orthogonal(m, seed=n), p


def online_factor_changed_since_v1(n: int) -> bool:
    """True when qfx's checkpoint format 1 rotated size n online with a random orthogonal factor
    that is now a Hadamard matrix (Goethals-Seidel), so a v1 model with that rotation would not
    reload as saved."""
    def split(gs):
        p = n & -n
        while p >= 1:
            if n // p == 1 or _hadamard(n // p, gs) is not None:
                return p
            p //= 2
        return None
    return split(False) != split(True)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ H_n over the last dim, H_n = M (x) H_p / sqrt(p) orthogonal (see `online_factors`);
    x @ H_n^T (its inverse) with `transpose`.

    x: (..., n). Computed in float32 (or float64 for float64 input), returned in x's dtype.
    """
    n = x.shape[-1]
    m_mat, p = online_factors(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(*x.shape[:-1], n // p, p)
    h = 1
    while h < p:  # butterflies over the power-of-two axis: (a, b) -> (a + b, a - b)
        y = y.reshape(*y.shape[:-1], p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(*x.shape[:-1], n // p, p)
        h *= 2
    y = y / math.sqrt(p)
    if m_mat is not None:  # row index i = a * p + b: (x (M (x) B))[a', b] = sum_a M[a, a'] (x B)[a, b]
        # H_p is symmetric, so H_n^T = M^T (x) H_p
        y = torch.einsum("...ab,ac->...cb", y, _mix_on(n, transpose, y.device, work))
    return y.reshape(x.shape).to(x.dtype)


_DEVICE_COPIES: dict[tuple, torch.Tensor] = {}


def _mix_on(n: int, transpose: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """M (or M^T) of `online_factors(n)` on `device` in `dtype`, copied there once: a copy
    made while a CUDA graph is being captured would be refused."""
    key = (n, transpose, device, dtype)
    if key not in _DEVICE_COPIES:
        m_mat = online_factors(n)[0]
        _DEVICE_COPIES[key] = (m_mat.T if transpose else m_mat).to(device=device, dtype=dtype)
    return _DEVICE_COPIES[key]


def hadamard_dense(n: int) -> torch.Tensor:
    """The matrix `hadamard_transform` multiplies by (n x n, float64, orthogonal)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64))


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """A random-sign Hadamard rotation diag(+-1) H_n / sqrt(n) (float64), as QuaRot uses for
    offline rotations; a random orthogonal matrix (with a warning) when no H_n is built."""
    h = _hadamard(n)
    if h is None:
        warnings.warn(f"no Hadamard matrix of order {n} is built here; using a random orthogonal rotation",
                      stacklevel=2)
        return random_orthogonal(n, seed)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * h / math.sqrt(n)
