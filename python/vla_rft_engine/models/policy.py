"""The VLA policy: f_VLM encoder -> z, flow-matching action head v_theta, Sigma Net sigma_psi.

    policy = VLAPolicy(PolicyConfig(proprio_dim=8))
    z = policy.encode(image, instruction, proprio)            # once per start state: (B, z_dim)
    loss = policy.flow_loss(z, s, actions_norm)               # Eq. 4 (SFT)
    a = policy.sample_ode(z, s)                               # deterministic Euler, K steps (eval)
    out = policy.sample_sde(z, s, num_samples=16, generator=g)   # Eq. 5-8 (RFT rollouts)
    lp = policy.log_prob(out.chain, z, s)["log_prob"]         # same, with gradients (GRPO ratio)
    policy.restart_sigma(0.08, 0.2, 0.1265)                   # Stage II: the Sigma Net's bounds and start
    env_actions = policy.act(image, instruction, proprio)     # raw in, unnormalised chunk out

Actions inside the policy live in a normalised space: per-dim min/max of the training data mapped
to [-1, 1] (buffers action_low/high, saved in the state dict and the checkpoint); proprio is
standardised with buffers proprio_mean/std. `s` passed to the head is the normalised proprio.
"""
from __future__ import annotations

import math
from typing import Any, cast


import torch
import torch.nn as nn

from .action_head import FlowHead, SigmaNet
from .policy_config import FLOW_TAU, PolicyConfig
from .encoders import HFVLMEncoder, SmallEncoder, check_finite
from .sde import SDESample, ode_sample, sde_log_prob, sde_sample



class VLAPolicy(nn.Module):
    action_low: torch.Tensor  # buffers registered in __init__
    action_high: torch.Tensor
    proprio_mean: torch.Tensor
    proprio_std: torch.Tensor

    def __init__(self, cfg: PolicyConfig, encoder: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.flow_tau = FLOW_TAU  # Beta(alpha, beta) of the flow-MSE tau (Eq. 4): SFT's law, carried by checkpoints
        # the camera frame size it was trained on (checkpoints carry it): the encoder takes any size, but a
        # policy run on frames of another scale than its demos sees another scene
        self.image_size: int | None = None
        if encoder is None:
            if cfg.encoder == "small":
                encoder = SmallEncoder(cfg.proprio_dim, cfg.z_dim, cfg.enc_channels, version=cfg.enc_version,
                                       keypoints=cfg.enc_keypoints, text_queries=cfg.enc_text_queries,
                                       dropout=cfg.enc_dropout, kp_temp=cfg.enc_kp_temp)
            else:
                encoder = HFVLMEncoder.from_pretrained(cfg.hf_path, layer=cfg.hf_layer, lora_rank=cfg.lora_rank)
        self.encoder = encoder
        z_dim = int(cast(Any, encoder).z_dim)  # every encoder exposes z_dim
        dims = (cfg.action_dim, cfg.chunk_len, z_dim, cfg.proprio_dim)
        self.flow_head = FlowHead(*dims, d_model=cfg.d_model, depth=cfg.depth, heads=cfg.heads)
        self.sigma_net = SigmaNet(*dims, d_model=cfg.sigma_d_model, depth=cfg.sigma_depth, heads=cfg.heads,
                                  sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_init=cfg.sigma_init)
        A, P = cfg.action_dim, cfg.proprio_dim
        self.register_buffer("action_low", -torch.ones(A))
        self.register_buffer("action_high", torch.ones(A))
        self.register_buffer("proprio_mean", torch.zeros(P))
        self.register_buffer("proprio_std", torch.ones(P))

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return (self.cfg.chunk_len, self.cfg.action_dim)

    # ---- normalisation ----------------------------------------------------------------------
    def set_norm_stats(self, actions: torch.Tensor, proprio: torch.Tensor) -> dict:
        """Fit stats on raw training data: actions (..., A), proprio (..., P). Returns them as a dict."""
        a = actions.reshape(-1, self.cfg.action_dim).float()
        p = proprio.reshape(-1, self.cfg.proprio_dim).float()
        check_finite("actions", a)
        check_finite("proprio", p)
        lo, hi = a.min(0).values, a.max(0).values
        pad = ((hi - lo) < 1e-6).float() * 1e-3  # constant dims: avoid dividing by 0
        self.action_low.copy_(lo - pad)
        self.action_high.copy_(hi + pad)
        self.proprio_mean.copy_(p.mean(0))
        std = p.std(0) if p.shape[0] > 1 else torch.ones_like(p[0])
        # a (near-)constant dim is left unscaled: dividing by a tiny std would blow up any drift at test time
        self.proprio_std.copy_(torch.where(std < 1e-3, torch.ones_like(std), std))
        return self.norm_stats()

    def norm_stats(self) -> dict:
        return {k: getattr(self, k).detach().cpu().clone()
                for k in ("action_low", "action_high", "proprio_mean", "proprio_std")}

    def normalize_actions(self, a):
        return 2.0 * (a - self.action_low) / (self.action_high - self.action_low) - 1.0

    def unnormalize_actions(self, a):
        return (a.clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.action_high - self.action_low) + self.action_low

    def normalize_proprio(self, p):
        check_finite("proprio", p)
        return (p.float() - self.proprio_mean) / self.proprio_std

    # ---- networks ---------------------------------------------------------------------------
    def encode(self, image, instruction, proprio) -> torch.Tensor:
        """f_VLM -> z (B, z_dim). Run this once per start state; everything below takes z."""
        z = self.encoder(image, instruction, self.normalize_proprio(proprio.to(self.proprio_mean.device)))
        check_finite("z", z)
        return z

    def velocity(self, z, s, a, tau):
        return self.flow_head(z, s, a, tau)

    def sigma(self, z, s, a, tau):
        return self.sigma_net(z, s, a, tau)

    def _check_chunk(self, actions):
        if actions.dim() != 3 or tuple(actions.shape[1:]) != self.chunk_shape:
            raise ValueError(f"action chunk must be (B, {self.cfg.chunk_len}, {self.cfg.action_dim}); "
                             f"got {tuple(actions.shape)}")
        check_finite("actions", actions)

    def flow_loss(self, z, s, actions, tau=None, noise=None, generator=None, alpha: float | None = None,
                  beta: float | None = None, reduction: str = "mean"):
        """Eq. 4 on normalised actions: ||v(z, s, a_tau, tau) - (a - eps)||^2, a_tau = tau a + (1-tau) eps,
        tau ~ Beta(alpha, beta) drawn with `generator` when not given; alpha / beta default to the policy's
        own law (self.flow_tau: SFT's tau_alpha / tau_beta, carried by checkpoints). FLOW_TAU Beta(1, 1.5): density
        prop. to (1 - tau)^0.5, i.e. more weight near tau = 0 (noise), pi0's choice (Black et al. 2024,
        Beta(1.5, 1) on 1 - tau in its own time convention): the high-noise steps are the hard ones."""
        self._check_chunk(actions)
        check_finite("z", z)
        check_finite("proprio s", s)
        B = actions.shape[0]
        if tau is None:
            a_, b_ = self.flow_tau
            tau = sample_beta(a_ if alpha is None else alpha, b_ if beta is None else beta, B, generator, actions.device)
        if noise is None:
            noise = torch.randn(actions.shape, generator=generator, device=actions.device)
        t = tau.view(B, 1, 1)
        a_tau = t * actions + (1.0 - t) * noise
        err = (self.flow_head(z, s, a_tau, tau) - (actions - noise)).pow(2)
        per = err.mean((1, 2))  # mean over chunk and dims (the sum differs by a constant factor)
        return per.mean() if reduction == "mean" else per

    # ---- sampling ---------------------------------------------------------------------------
    def sample_ode(self, z, s, num_steps: int | None = None, noise=None, generator=None) -> torch.Tensor:
        return ode_sample(self.velocity, z, s, self.chunk_shape, num_steps or self.cfg.num_steps, noise, generator)

    def sample_sde(self, z, s, num_samples: int = 1, num_steps: int | None = None, generator=None,
                   a0=None, logprob_reduce: str = "mean") -> SDESample:
        """logprob_reduce: how Eq. 8 reduces over the K steps, "mean" (paper) or "sum" (release); Stage II's
        setting (grpo.logprob_reduce), not the policy's."""
        return sde_sample(self.velocity, self.sigma, z, s, self.chunk_shape, num_samples,
                          num_steps or self.cfg.num_steps, generator, logprob_reduce, self.cfg.backend, a0)

    def log_prob(self, chain, z, s, per_element: bool = False, logprob_reduce: str = "mean") -> dict[str, torch.Tensor]:
        """models.sde.sde_log_prob; per_element adds element_log_prob / element_entropy (B, N, T, A)."""
        return sde_log_prob(self.velocity, self.sigma, chain, z, s, logprob_reduce, self.cfg.backend, per_element)

    def restart_sigma(self, sigma_min: float = 0.0, sigma_max: float = 0.0, sigma_init: float = 0.0) -> None:
        """Stage II: give the Sigma Net new bounds (both > 0) and / or restart it at sigma_init for every input
        (0: keep). New bounds without sigma_init start it at their geometric mean, the value the release's
        tanh-squashed log-std takes at a zero output (sqrt(0.08 * 0.2) = 0.126). cfg follows, so checkpoints
        rebuild the same net."""
        lo, hi = (sigma_min, sigma_max) if sigma_min > 0 or sigma_max > 0 else (self.cfg.sigma_min, self.cfg.sigma_max)
        init = sigma_init if sigma_init > 0 else (math.sqrt(lo * hi) if sigma_min > 0 or sigma_max > 0 else 0.0)
        if init <= 0:
            return
        self.sigma_net.set_bounds(lo, hi)  # checks 0 < lo < hi
        self.sigma_net.reset_sigma(init)   # checks lo < init < hi
        self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.sigma_init = lo, hi, init

    @torch.no_grad()
    def act(self, image, instruction, proprio, num_steps: int | None = None, generator=None) -> torch.Tensor:
        """Raw observation -> unnormalised action chunk (B, T, A) with the deterministic ODE sampler."""
        z = self.encode(image, instruction, proprio)
        s = self.normalize_proprio(proprio.to(z.device))
        return self.unnormalize_actions(self.sample_ode(z, s, num_steps, generator=generator))


def sample_beta(alpha: float, beta: float, n: int, generator=None, device=None) -> torch.Tensor:
    """tau ~ Beta(alpha, beta) drawn from a torch.Generator (reproducible, resumable; torch's Beta/Gamma
    samplers take no generator). alpha, beta >= 1 (bounded density, e.g. the paper's Beta(1, 1.5)): the Beta
    CDF tabulated on a fine grid, inverted. Either below 1 (the density is infinite at an end, where a grid
    cannot follow it): X / (X + Y) from two Gamma draws. Capped at 0.999 (pi0's s = 0.999) so a_tau never
    equals the clean action exactly."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta(alpha, beta) needs alpha, beta > 0; got {alpha}, {beta}")
    if alpha < 1 or beta < 1:
        x, y = _gamma(alpha, n, generator, device), _gamma(beta, n, generator, device)
        return (x / (x + y)).float().nan_to_num_(0.0).clamp_(0.0, 0.999)
    u = torch.rand(n, generator=generator, device=device)
    return _beta_icdf(u, alpha, beta)


def _gamma(a: float, n: int, generator=None, device=None) -> torch.Tensor:
    """Gamma(a, 1) in float64 by Marsaglia & Tsang's squeeze-free rejection (a >= 1), boosted for a < 1 by
    Gamma(a) = Gamma(a + 1) * U^(1/a). Every draw from `generator`."""
    boost = a < 1
    d = (a + 1 if boost else a) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        m = todo.numel()
        x = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.clamp_min(1e-300).log())
        out[todo[ok]] = (d * v)[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / a)
    return out


def _beta_icdf(u: torch.Tensor, alpha: float, beta: float, grid: int = 4097) -> torch.Tensor:
    x = torch.linspace(0.0, 1.0, grid, device=u.device, dtype=torch.float64)
    logpdf = (alpha - 1) * torch.log(x.clamp_min(1e-12)) + (beta - 1) * torch.log((1 - x).clamp_min(1e-12))
    pdf = torch.exp(logpdf - logpdf.max())
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64, device=u.device),
                     torch.cumsum(0.5 * (pdf[1:] + pdf[:-1]), 0)])
    cdf = cdf / cdf[-1]
    idx = torch.searchsorted(cdf, u.double().clamp(0, 1)).clamp(1, grid - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    w = ((u.double() - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
    return (x[idx - 1] + w * (x[idx] - x[idx - 1])).float().clamp(0.0, 0.999)
