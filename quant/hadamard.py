"""Normalised Hadamard rotations of any tensor axis, in a few tensor-core matmuls for the sizes LLMs use.

HALO (`quant.halo`) rotates activations, weights and gradients by an orthogonal Hadamard matrix before
quantizing them, so that an outlier is spread over a whole row and a per-tensor FP8 scale fits the rest.

Why hand-written. `fast-hadamard-transform` (Dao-AILab) is a CUDA extension compiled at install time: no
CPU path for the tests, and the GPU machine reaches no package registry, so it would have to be built
elsewhere against its exact torch and carried over. `scipy.linalg.hadamard` builds dense powers of two
only (an O(n^2) product, and 14336 is not a power of two); torch has no Hadamard op. What we need is
small, and the Kronecker structure below turns it into batched matmuls that run on any device torch
does, so the CPU tests and the GPU share one code path. A fused Triton/CUDA kernel can replace `rotate`
later if the GPU profile says its memory traffic matters.

How it is applied. H_p of order p = 2^k is itself a Kronecker product of smaller Sylvester matrices, so
`rotate` reshapes the axis into factors of order <= 64 and multiplies each by its small dense matrix:
p = 512 = 64 * 8 is two passes over the data with 2 * (64 + 8) flops per element, where a radix-2
butterfly would make nine passes. The cost is O(n * sum of factor orders), i.e. O(n log n) with a larger
constant that tensor cores absorb.

Which matrix, for size n (`hadamard_layout`):
    n = blocks * d * p, p a power of two, d the dense factor (1 or a Paley order), H_n = I_blocks ⊗ H_d ⊗ H_p.
    - p: the Sylvester matrix H_p = H_2 ⊗ ... ⊗ H_2 = H_64 ⊗ ... ⊗ H_(remainder), applied factor by factor.
    - d: a Paley construction, chosen as small as possible: Paley I gives order q + 1 for a prime
      q ≡ 3 (mod 4) (12, 20, 44, 60, ...), Paley II order 2(q + 1) for a prime q ≡ 1 (mod 4) (28, 36, 148, ...).
      14336 = 28 * 512 (LLaMA-3-8B's F) uses d = 28 (Paley II, q = 13); 10240 = 20 * 512; 18944 = 148 * 128.
      The Kronecker product of Hadamard matrices is a Hadamard matrix, so H_d ⊗ H_p mixes all n entries.
    - blocks > 1 only when n has no such factorisation (n not a multiple of 4 times a usable odd part, e.g. a
      token count of 66): block-diagonal copies of the largest constructible divisor. Mixing is then only
      within each block, but the matrix is still orthogonal, so every HALO identity below still holds exactly.
Every factor is scaled by 1/sqrt(its order), so H_n is orthogonal: H_n H_n^T = I. Paley I matrices are not
symmetric, so the inverse (`inverse=True`) applies H_n^T, not H_n.

Block-diagonal rotations (`rotate_blocks`). HALO's GPU path rotates by I_(n/b) ⊗ H_b, a normalised
Sylvester matrix of order b = 4^k <= 256 repeated along the diagonal, as HALO's reference code does with its
`had_size`: one matmul with K = b in the operand's own dtype (bf16 on the GPU), 2b flops per element and
one read and one write, where the full H_n above takes a pass per factor in fp32. Mixing is then within
each block of b entries, so an outlier's amax drops by sqrt(b) = 16 rather than sqrt(n). b is a power of
4 so that every entry, ±1/sqrt(b) = ±2^-k, is exact in bf16: the matrix stays exactly orthogonal.

Convention: `rotate(x, dim)` multiplies axis `dim` by H_n from the right, y[..., j, ...] = sum_i x[..., i, ...]
H_n[i, j]; for a matrix X_TI that is X H (dim=-1) or H^T X (dim=0). `rotate(rotate(x, dim), dim, inverse=True)
== x` up to rounding.

Shapes: n the size of the rotated axis; d, p, blocks as above.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Largest Paley factor worth its n*d multiply-adds; every Paley order a LLaMA/GPT/Qwen dimension needs
# (12, 20, 28, 44, 148) is below it.
MAX_DENSE_ORDER = 256
# Largest Sylvester factor a power of two is split into: one matmul pass of 2*64 flops per element.
SYLVESTER_FACTOR_ORDER = 64


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % k for k in range(2, math.isqrt(q) + 1))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(d: int) -> str | None:
    """'I' or 'II' if a Paley construction gives a Hadamard matrix of order d, else None."""
    if _is_prime(d - 1) and (d - 1) % 4 == 3:
        return "I"
    if d % 2 == 0 and _is_prime(d // 2 - 1) and (d // 2 - 1) % 4 == 1:
        return "II"
    return None


def _dense_factor(n: int) -> int | None:
    """Smallest d with n = d * 2^k and an H_d we can build (1 for powers of two), or None."""
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return 1
    d = odd
    while n % d == 0 and d <= MAX_DENSE_ORDER:
        if _paley_kind(d) is not None:
            return d
        d *= 2
    return None


@dataclass(frozen=True)
class HadamardLayout:
    """H_n = I_blocks ⊗ H_dense ⊗ H_power (see the module docstring).

    Attributes:
        size: n.
        blocks: diagonal blocks; 1 means one full Hadamard matrix of order n.
        dense: order of the dense Paley factor (1: none).
        power: order of the Sylvester factor, a power of two.
    """

    size: int
    blocks: int
    dense: int
    power: int

    @property
    def is_full(self) -> bool:
        """Whether H_n mixes all n entries (no block-diagonal fallback)."""
        return self.blocks == 1


@functools.cache
def hadamard_layout(n: int) -> HadamardLayout:
    """How `rotate` builds its orthogonal matrix of order n.

    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"a Hadamard rotation needs a positive size, got {n}")
    # Largest divisor b of n that has a full construction; the rest becomes diagonal blocks.
    for blocks in range(1, n + 1):
        if n % blocks:
            continue
        dense = _dense_factor(n // blocks)
        if dense is not None:
            return HadamardLayout(size=n, blocks=blocks, dense=dense, power=n // blocks // dense)
    raise AssertionError("unreachable: blocks = n leaves a 1x1 matrix")


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


@functools.cache
def _paley_matrix(d: int) -> torch.Tensor:
    """An unnormalised ±1 Hadamard matrix of Paley order d, float64 on the CPU."""
    kind = _paley_kind(d)
    assert kind is not None, d
    q = d - 1 if kind == "I" else d // 2 - 1
    # Jacobsthal matrix Q[i, j] = chi(j - i), chi the quadratic character of GF(q).
    jacobsthal = torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)
    ones = torch.ones(q, dtype=torch.float64)
    if kind == "I":
        # q ≡ 3 (mod 4): Q is skew; S = [[0, 1^T], [-1, Q]] is skew and S S^T = q I, so H = I + S.
        skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        skew[0, 1:], skew[1:, 0], skew[1:, 1:] = ones, -ones, jacobsthal
        return torch.eye(q + 1, dtype=torch.float64) + skew
    # q ≡ 1 (mod 4): Q is symmetric; C = [[0, 1^T], [1, Q]] is a symmetric conference matrix, and
    # H = C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]] is Hadamard of order 2(q + 1).
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = ones, ones, jacobsthal
    off_diagonal = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    diagonal = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, off_diagonal) + torch.kron(torch.eye(q + 1, dtype=torch.float64), diagonal)


@functools.lru_cache(maxsize=64)
def _dense_on(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (_paley_matrix(d) / math.sqrt(d)).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _sylvester_on(order: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unnormalised ±1 Sylvester matrix of a power-of-two order (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h.to(device=device, dtype=dtype)


def _sylvester_factors(p: int) -> list[int]:
    """Orders of the Sylvester factors of H_p, each <= SYLVESTER_FACTOR_ORDER, e.g. 512 -> [64, 8]."""
    factors = []
    while p > 1:
        factors.append(min(p, SYLVESTER_FACTOR_ORDER))
        p //= factors[-1]
    return factors


def _apply_along(y_LFR: torch.Tensor, h_FF: torch.Tensor) -> torch.Tensor:
    """y[l, g, r] = sum_f h[f, g] y[l, f, r]: one factor of a Kronecker product along the middle axis.

    A batched matmul over L with no transposed copy: h^T [F, F] times each y[l] [F, R].
    """
    return torch.matmul(h_FF.t(), y_LFR)


def rotate(x: torch.Tensor, dim: int = -1, *, inverse: bool = False) -> torch.Tensor:
    """Multiply axis `dim` of `x` by the orthogonal H_n from the right (H_n^T if `inverse`).

    Args:
        x: any shape, floating point, any device; n = x.shape[dim].
        dim: the axis to rotate.
        inverse: apply H_n^T, undoing `rotate(x, dim)`.

    Returns:
        A new tensor of x's shape, dtype and device. Half-precision inputs are transformed in fp32 and
        rounded once at the end, so the factor passes do not each add a bf16 rounding.
    """
    layout = hadamard_layout(x.shape[dim])
    work_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    moved = x.movedim(dim, -1).to(work_dtype)
    # Index i of the axis in mixed radix (block, a, f_1, ..., f_k), most significant first, matching
    # I_blocks ⊗ H_d ⊗ H_f1 ⊗ ... ⊗ H_fk; each factor acts on its own digit: [L, F, R] views.
    factors = [_sylvester_on(order, x.device, work_dtype) for order in _sylvester_factors(layout.power)]
    if layout.dense > 1:
        h_dd = _dense_on(layout.dense, x.device, work_dtype)
        factors.insert(0, h_dd.t() if inverse else h_dd)  # Paley I is not symmetric; Sylvester factors are
    outer = moved.numel() // moved.shape[-1] * layout.blocks
    inner = layout.dense * layout.power
    y = moved
    for h in factors:
        order = h.shape[0]
        inner //= order
        y = _apply_along(y.reshape(outer, order, inner), h)
        outer *= order
    y = y * (1.0 / math.sqrt(layout.power))
    return y.reshape(moved.shape).to(x.dtype).movedim(-1, dim)


def block_order(n: int, max_block: int) -> int:
    """The order b of the diagonal blocks `rotate_blocks` uses: the largest power of 4 that divides n and is
    <= max_block (1, no rotation, for n not divisible by 4)."""
    order = 1
    while order * 4 <= max_block and n % (order * 4) == 0:
        order *= 4
    return order


@functools.lru_cache(maxsize=64)
def _normalised_sylvester_on(order: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    assert order & (order - 1) == 0 and math.isqrt(order) ** 2 == order, order  # a power of 4: entries exact
    return (_sylvester_on(order, torch.device("cpu"), torch.float64) / math.isqrt(order)).to(device=device, dtype=dtype)


def rotate_blocks(x: torch.Tensor, dim: int = -1, *, max_block: int = 256) -> torch.Tensor:
    """Multiply axis `dim` of `x` by I_(n/b) ⊗ H_b from the right, b = `block_order(n, max_block)`.

    H_b is the normalised Sylvester matrix: symmetric and orthogonal, so the same call also undoes itself
    (rotate_blocks(rotate_blocks(x, d), d) == x up to rounding).

    Args:
        x: any shape, floating point, any device; n = x.shape[dim].
        dim: the axis to rotate.
        max_block: the largest block order; a power of 4.

    Returns:
        A new tensor of x's shape, dtype and device (x itself when b = 1). One matmul in x's dtype: on CUDA
        a bf16 x is multiplied on tensor cores with fp32 accumulation and rounded once to bf16.
    """
    n = x.shape[dim]
    order = block_order(n, max_block)
    if order == 1:
        return x
    h_bb = _normalised_sylvester_on(order, x.device, x.dtype)
    dim = dim % x.ndim
    if dim == x.ndim - 1:
        return (x.reshape(-1, order) @ h_bb).reshape(x.shape)
    # Axis `dim` first, then [n / b, b, rest]: H_b^T (= H_b) times each [b, rest] slice, a batched matmul.
    moved = x.movedim(dim, 0)
    y = torch.matmul(h_bb, moved.reshape(n // order, order, -1))
    return y.reshape(moved.shape).movedim(0, dim)


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """The dense orthogonal H_n that `rotate` applies (rotate(eye) = eye @ H_n); for tests and small n."""
    return rotate(torch.eye(n, dtype=dtype, device=device), dim=-1)
