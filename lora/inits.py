"""Adapter initialisations, one named function each (selected by ``add_lora(init=...)``).

Every init takes the frozen weight W (d_out x d_in), the rank r and the scale s (and, for
``gradient``, the layer's loss gradient G = dL/dW), and returns
``(A, B, W_res)`` with A: r x d_in, B: d_out x r and W_res the weight the base layer keeps
(None when W is kept as it is), so that

    W_res + s * B @ A  ==  W        (up to rounding)

i.e. the model is unchanged at step 0. Random and gradient inits leave W alone (B = 0,
W_res = W); SVD inits move the chosen singular components of W into the adapter. ``INITS``
records which is which (``changes_w``). All math runs in ``compute_dtype`` (float32 or higher)
whatever the model dtype; results come back in W's dtype.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

SVD_SPLITS = ("sqrt", "b")
SVD_SOLVERS = ("exact", "randomized")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The one dtype rule: adapter math runs in float64 for float64 tensors, else float32
    (bf16 / fp16 models included)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _zero_b(w, rank):
    return torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device)


def kaiming(w, rank, scale, generator=None, **_):
    """LoRA's default: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming-uniform with a=sqrt(5), as
    nn.Linear), B = 0, W_res = W (None)."""
    d_in = w.shape[1]
    bound = 1.0 / math.sqrt(d_in)
    a = torch.empty(rank, d_in, dtype=compute_dtype(w), device=w.device)
    a.uniform_(-bound, bound, generator=generator)
    return a.to(w.dtype), _zero_b(w, rank), None


def orthogonal(w, rank, scale, generator=None, **_):
    """A has orthonormal rows (Q of the QR of a Gaussian d_in x r matrix), B = 0, W_res = W:
    the frozen random projection of the LoRA-FA paper, which keeps ||A x|| = ||x|| on A's span."""
    d_in = w.shape[1]
    g = torch.randn(d_in, rank, dtype=compute_dtype(w), device=w.device, generator=generator)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # fix the sign so the result is unique for a seed
    return q.T.contiguous().to(w.dtype), _zero_b(w, rank), None


def _svd_components(w, rank, *, minor, solver, niter, generator):
    """Top (or bottom, ``minor``) r singular triplets of W in float32+: U_r, S_r, V_r^T."""
    wc = w.to(compute_dtype(w))
    if solver == "exact":
        u, s, vh = torch.linalg.svd(wc, full_matrices=False)
        idx = slice(-rank, None) if minor else slice(0, rank)
        return u[:, idx], s[idx], vh[idx]
    if solver == "randomized":
        if minor:
            raise ValueError("init='svd_minor' needs svd_solver='exact': randomized SVD only "
                             "finds the largest singular values")
        # svd_lowrank draws from the global RNG: fork it so the caller's stream is untouched
        # and the result depends only on the seed.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            torch.manual_seed(seed)
            q = min(rank + 10, *wc.shape)  # a little oversampling, as Halko et al. recommend
            u, s, v = torch.svd_lowrank(wc, q=q, niter=niter)
        return u[:, :rank], s[:rank], v[:, :rank].T
    raise ValueError(f"unknown svd_solver {solver!r}: use one of {SVD_SOLVERS}")


def _svd_init(w, rank, scale, *, minor, generator=None, svd_solver="exact", niter=4,
              svd_split="sqrt", **_):
    if svd_split not in SVD_SPLITS:
        raise ValueError(f"unknown svd_split {svd_split!r}: use one of {SVD_SPLITS}")
    u, s, vh = _svd_components(w, rank, minor=minor, solver=svd_solver, niter=niter,
                               generator=generator)
    s = s / scale  # so that scale * B @ A == U S V^T
    if svd_split == "sqrt":  # PiSSA: sqrt(S) on each side, A and B of equal norm
        a, b = s.sqrt()[:, None] * vh, u * s.sqrt()[None, :]
    else:  # "b": all of S in B, A = V_r^T has orthonormal rows
        a, b = vh, u * s[None, :]
    a, b = a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()
    return a, b, residual(w, a, b, scale)


def residual(w, a, b, scale):
    """W_res = W - s B A, from the *rounded* A and B: W_res + s B A == W then holds to rounding
    even when the SVD is approximate (randomized) or A, B are in low precision."""
    ct = compute_dtype(w)
    return (w.to(ct) - scale * (b.to(ct) @ a.to(ct))).to(w.dtype)


def svd(w, rank, scale, **kw):
    """Principal components (PiSSA): W ~= U_r S_r V_r^T (largest r singular values).
    svd_split='sqrt': A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s); 'b': A = V_r^T, B = U_r S_r/s.
    W_res = W - s B A holds the remaining components; by Eckart-Young
    ||W_res||_F^2 = sum of the discarded sigma_i^2."""
    return _svd_init(w, rank, scale, minor=False, **kw)


def svd_minor(w, rank, scale, **kw):
    """Minor components (MiLoRA): as ``svd`` with the r *smallest* singular triplets, so the
    adapter starts in the directions W uses least and W_res keeps the principal part."""
    return _svd_init(w, rank, scale, minor=True, **kw)


def gradient(w, rank, scale, *, grad, generator=None, svd_solver="exact", niter=4,
             gradient_step=0.0, **_):
    """Gradient-aligned frozen A (LoRA-One / LoRA-GA's argument, for LoRA-FA): with A frozen,
    B's update reaches W as dW = s dB A, so only G A^T A - the part of the full fine-tuning
    gradient G = dL/dW inside A's row space - can act. By Eckart-Young the rank-r A that keeps
    most of G is A = V_r(G)^T, the top-r right singular vectors of G (orthonormal rows; exact or
    randomized SVD). B = 0 and W_res = W (None): the model is unchanged at step 0. The first
    SGD step on B then moves W by -lr s^2 G V_r V_r^T = -lr s^2 G_r, the best rank-r step.
    ``grad`` is G (d_out x d_in), e.g. from ``lora.estimate_gradients``.

    ``gradient_step`` = eta > 0 (LoRA-One's one step): B = -eta U_r S_r / s, so s B A = -eta G_r
    and the model starts one rank-r gradient step away from W (W_res = W, B0 = 0 still: the
    original model is the one at B = 0)."""
    u, sig, vh = _svd_components(grad, rank, minor=False, solver=svd_solver, niter=niter,
                                 generator=generator)
    b = (-gradient_step / scale) * u * sig[None, :] if gradient_step else _zero_b(w, rank)
    return vh.to(w.dtype).contiguous(), b.to(w.dtype).contiguous(), None


class Init(NamedTuple):
    fn: Callable  # (w, rank, scale, **kw) -> (A, B, W_res)
    changes_w: bool  # True: B0 != 0 and W_res = W - s B0 A (SVD inits); False: B0 = 0, W kept
    uses: tuple = ()  # the add_lora settings beyond rank/alpha/seed that this init reads
    needs_gradient: bool = False  # fn takes grad=G; add_lora(gradients={name: G})


_SVD = ("svd_solver", "niter")
INITS = {
    "kaiming": Init(kaiming, changes_w=False),
    "orthogonal": Init(orthogonal, changes_w=False),
    "svd": Init(svd, changes_w=True, uses=(*_SVD, "svd_split")),
    "svd_minor": Init(svd_minor, changes_w=True, uses=("svd_split",)),  # exact SVD only
    "gradient": Init(gradient, changes_w=False, uses=(*_SVD, "gradient_step"),
                     needs_gradient=True),
}
