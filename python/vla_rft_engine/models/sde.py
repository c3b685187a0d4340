"""SDE policy sampling and log-probs (Eq. 5-8), and the deterministic ODE sampler.

K Euler steps of size delta = 1/K integrate tau from 0 (noise, a_0 ~ N(0, I)) to 1 (data):
    mu_k = a_k + delta * v(z, s, a_k, k delta),   sigma_k = SigmaNet(z, s, a_k, k delta)
    a_{k+1} ~ N(mu_k, diag(sigma_k^2)),           k = 0 .. K-1   (every transition is stochastic)
Rollout log-prob (Eq. 8): lbar = mean_k log p(a_{k+1} | a_k) ('sum' as in the authors' code), each
term summed over the chunk and action dims. Entropy per step: sum over dims of log sigma + 0.5 log(2 pi e),
then averaged over the K steps (same reduction scale as lbar).
Per action element (sde_log_prob(per_element=True), the release's GRPO granularity): each element's
log-density reduced over the K steps the same way, and its entropy summed over the K steps / (K + 1)
(the release divides by the chain's K + 1 points).

`velocity` and `sigma` are callables (z, s, a, tau) -> (B, T, A) (FlowHead / SigmaNet). z is given
per START STATE (B, Z) and expanded (a view, no copy) over the N samples, so the encoder never runs
per sample. Shapes out: chain (B, N, K+1, T, A), per-step log-probs / entropies (B, N, K),
log_prob / entropy (B, N).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.sde_euler_step import HALF_LOG_2PIE, LOG_2PI, compute_dtype, euler_step
from ..kernels.sde_log_prob import sde_log_prob as fused_log_prob
from ..utils import nvtx_range

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
REDUCES = ("mean", "sum")


@dataclass
class SDESample:
    chain: torch.Tensor           # (B, N, K+1, T, A): a_0 (noise) .. a_K (the action chunk)
    step_log_probs: torch.Tensor  # (B, N, K)
    log_prob: torch.Tensor        # (B, N): Eq. 8 reduced over steps
    step_entropy: torch.Tensor    # (B, N, K)
    entropy: torch.Tensor         # (B, N): mean over steps
    sigmas: torch.Tensor          # (B, N, K, T, A)

    @property
    def actions(self) -> torch.Tensor:
        return self.chain[:, :, -1]


def _check_cond(z: torch.Tensor, s: torch.Tensor) -> None:
    from .encoders import check_finite
    if z.dim() != 2 or s.dim() != 2 or z.shape[0] != s.shape[0]:
        raise ValueError(f"z must be (B, Z) and s (B, P) with the same B; got {tuple(z.shape)}, {tuple(s.shape)}")
    check_finite("z", z)
    check_finite("proprio s", s)


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, X) -> (B*n, X) without re-running whatever produced t."""
    return t[:, None].expand(t.shape[0], n, *t.shape[1:]).reshape(t.shape[0] * n, *t.shape[1:])


def reduce_steps(step: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce not in REDUCES:
        raise ValueError(f"log-prob reduce must be one of {REDUCES}, got {reduce!r}")
    return step.mean(-1) if reduce == "mean" else step.sum(-1)


@torch.no_grad()
def ode_sample(velocity: Net, z, s, chunk_shape: tuple[int, int], num_steps: int = 10,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Deterministic Euler ODE a_{k+1} = a_k + delta v: (B, T, A) chunks from a_0 = noise."""
    _check_cond(z, s)
    B = z.shape[0]
    a = noise if noise is not None else torch.randn(B, *chunk_shape, generator=generator, device=z.device)
    a = a.float()
    delta = 1.0 / num_steps
    for k in range(num_steps):
        tau = torch.full((B,), k * delta, device=z.device)
        a = a + delta * velocity(z, s, a, tau).float()
    return a


@torch.no_grad()
def sde_sample(velocity: Net, sigma: Net, z, s, chunk_shape: tuple[int, int], num_samples: int = 1,
               num_steps: int = 10, generator: torch.Generator | None = None, reduce: str = "mean",
               backend: str = "auto", a0: torch.Tensor | None = None) -> SDESample:
    """Draw num_samples chunks per start state with the K-step Euler-Maruyama chain (Eq. 5-7).

    Noise (a_0 and every step's eps) comes from `generator` in a fixed order, so a seeded generator
    gives the same samples on the 'torch' and 'triton' backends. a0: optional (B, N, T, A) start noise.
    """
    _check_cond(z, s)
    if num_samples < 1 or num_steps < 1:
        raise ValueError(f"num_samples and num_steps must be >= 1; got {num_samples}, {num_steps}")
    B, N, K = z.shape[0], num_samples, num_steps
    T, A = chunk_shape
    dev = z.device
    delta = 1.0 / K
    zz, ss = _expand(z, N), _expand(s, N)
    if a0 is None:
        a = torch.randn(B * N, T, A, generator=generator, device=dev)
    else:
        if a0.shape != (B, N, T, A):
            raise ValueError(f"a0 must be (B, N, T, A) = {(B, N, T, A)}; got {tuple(a0.shape)}")
        a = a0.reshape(B * N, T, A).float()
    chain, lps, ents, sigs = [a], [], [], []
    for k in range(K):
        tau = torch.full((B * N,), k * delta, device=dev)
        with nvtx_range(f"sde_step_{k}"):
            v = velocity(zz, ss, a, tau)
            sig = sigma(zz, ss, a, tau)
            eps = torch.randn(B * N, T, A, generator=generator, device=dev)
            a, lp, ent = euler_step(a, v, sig, eps, delta, backend=backend)
        chain.append(a)
        lps.append(lp)
        ents.append(ent)
        sigs.append(sig.float())
    step_lp = torch.stack(lps, -1).view(B, N, K)
    step_ent = torch.stack(ents, -1).view(B, N, K)
    return SDESample(chain=torch.stack(chain, 1).view(B, N, K + 1, T, A), step_log_probs=step_lp,
                     log_prob=reduce_steps(step_lp, reduce), step_entropy=step_ent, entropy=step_ent.mean(-1),
                     sigmas=torch.stack(sigs, 1).view(B, N, K, T, A))


def element_log_prob(x, a, v, sigma, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element Gaussian log-density of x ~ N(a + delta v, sigma^2) and entropy, unsummed (autograd)."""
    cd = compute_dtype(x.dtype)
    x, a, v, sigma = (t.to(cd) for t in (x, a, v, sigma))
    log_s = torch.log(sigma)
    r = (x - (a + delta * v)) / sigma
    return -0.5 * r * r - log_s - 0.5 * LOG_2PI, log_s + HALF_LOG_2PIE


def sde_log_prob(velocity: Net, sigma: Net, chain: torch.Tensor, z, s, reduce: str = "mean",
                 backend: str = "auto", per_element: bool = False) -> dict[str, torch.Tensor]:
    """Recompute the chain's log-probs with gradients (all K steps in one batched network call).

    chain (B, N, K+1, T, A) -> dict(log_prob (B, N), step_log_probs (B, N, K), entropy (B, N),
    step_entropy (B, N, K)). Gradients reach velocity's and sigma's parameters (and z if it needs them).
    per_element: computed per element (eager torch, not the fused kernel), adding element_log_prob
    (B, N, T, A) (reduced over the K steps) and element_entropy (B, N, T, A) (summed over the K steps / (K+1)).
    """
    _check_cond(z, s)
    if chain.dim() != 5 or chain.shape[0] != z.shape[0] or chain.shape[2] < 2:
        raise ValueError(f"chain must be (B={z.shape[0]}, N, K+1>=2, T, A); got {tuple(chain.shape)}")
    from .encoders import check_finite
    check_finite("chain", chain)
    B, N, K1, T, A = chain.shape
    K = K1 - 1
    delta = 1.0 / K
    a_prev = chain[:, :, :-1].reshape(B * N * K, T, A)
    x = chain[:, :, 1:].reshape(B * N * K, T, A)
    tau = (torch.arange(K, device=chain.device, dtype=torch.float32) * delta).repeat(B * N)
    zz, ss = _expand(z, N * K), _expand(s, N * K)
    v = velocity(zz, ss, a_prev, tau)
    sig = sigma(zz, ss, a_prev, tau)
    if per_element:
        lp_e, ent_e = (t.view(B, N, K, T, A) for t in element_log_prob(x, a_prev, v, sig, delta))
        step_lp, step_ent = lp_e.sum((3, 4)), ent_e.sum((3, 4))
        extra = {"element_log_prob": reduce_steps(lp_e.movedim(2, -1), reduce),
                 "element_entropy": ent_e.sum(2) / (K + 1)}
    else:
        lp, ent = fused_log_prob(x, a_prev, v, sig, delta, backend=backend)
        step_lp, step_ent, extra = lp.view(B, N, K), ent.view(B, N, K), {}
    return {"log_prob": reduce_steps(step_lp, reduce), "step_log_probs": step_lp,
            "entropy": step_ent.mean(-1), "step_entropy": step_ent, **extra}
