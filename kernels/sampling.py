"""Fused temperature / top-k / top-p sampling from given Gumbel noise (deterministic, no sort).

Order as in HF generate: logits / temperature -> keep top-k -> keep the smallest set of top-p mass ->
token = argmax(z + gumbel) over the kept set (Gumbel-max = a draw from the renormalised softmax).
The kernel finds the top-k value and the top-p probability threshold by bisection on the value (enough
steps to reach adjacent floats), so it needs no sort; near-exact ties at the boundary may resolve
differently from the sort-based reference. Also returns log p(token) under softmax(z) over all V
(temperature-scaled, before truncation): the quantity RL ratios need. temperature == 0 -> argmax, T=1 log-prob.
Only the V columns passed are candidates: the engine passes logits[:, :num_codes] (dynamics codes).
"""
from __future__ import annotations

import functools

import torch

try:
    from vla_rft_engine import _sampling_cpu as _ext  # type: ignore[attr-defined]  # compiled, no stub
except ImportError:  # not built: _nucleus_argmax (torch ops, same verdicts) runs instead
    _ext = None


def nucleus_check_built() -> bool:
    return _ext is not None


def gumbel_noise(shape, generator=None, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """-log(-log(u)); with `out` the draw is written in place (same values, same generator stream)."""
    return gumbel_from_uniform_(torch.rand(shape, generator=generator, device=device, out=out))


GUMBEL_CLAMP = (1e-10, 1.0 - 1e-7)
_gumbel_cpp = getattr(_ext, "gumbel_", None)  # None: not built, or a build from before the op


def gumbel_from_uniform_(u: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)) in place, u clamped away from 0 and 1 first (the rollout draws u itself, outside its graphs).
    fp32 on the CPU: one vectorised C++ pass (csrc/sampling_cpu.cpp, as accurate as torch.log; tested against
    float64), instead of torch's four passes; else gumbel_from_uniform_reference_."""
    if _gumbel_cpp is not None and u.device.type == "cpu" and u.dtype == torch.float32 and u.is_contiguous():
        return _gumbel_cpp(u, *GUMBEL_CLAMP)
    return gumbel_from_uniform_reference_(u)


def gumbel_from_uniform_reference_(u: torch.Tensor) -> torch.Tensor:
    return u.clamp_(*GUMBEL_CLAMP).log_().neg_().log_().neg_()


def sample_reference(logits, noise, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """logits (B, V), noise (B, V) gumbel -> (token (B,) int64, logprob (B,) fp32)."""
    x = logits.float()
    if temperature == 0:
        tok = x.argmax(-1)
        return tok, x.log_softmax(-1).gather(1, tok[:, None])[:, 0]
    z = x / temperature
    s = z
    if top_k > 0 and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        s = s.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        p = s.softmax(-1)
        ps, order = p.sort(-1, descending=True)
        drop_sorted = (ps.cumsum(-1) - ps) >= top_p  # mass strictly above this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        s = s.masked_fill(drop, float("-inf"))
    tok = (s + noise.float()).argmax(-1)
    return tok, z.log_softmax(-1).gather(1, tok[:, None])[:, 0]


def sample_cpu(logits, noise, temperature: float, top_k: int = 0, top_p: float = 1.0, logprob: bool = True):
    """sample_reference's result without its full argsort (the CPU decode loop's main cost at V=4375).

    Most rows need no sort at all (_nucleus_argmax; in C++ where csrc/sampling_cpu.cpp is built): the Gumbel-max
    winner over all V is checked against the
    top-p set by the mass above it. The rest are cut by sorted values: a value sort plus torch's cumsum
    reproduce the reference's per-position drop mask bit for bit; the kept set is then p >= the smallest kept
    value. Only the values above 1/V are sorted when they hold the cut (_head_cut), else all of them. Where
    the cut could differ from the reference (a tie straddling it, a drop mask that is not a prefix,
    non-finite values) the reference itself runs. logprob=False skips the log-prob.
    """
    if temperature == 0 or top_p >= 1.0 or logits.device.type != "cpu":
        tok, lp = sample_reference(logits, noise, temperature, top_k, top_p)
        return tok, (lp if logprob else None)
    z = logits.float() / temperature
    s = z
    if top_k > 0 and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        s = s.masked_fill(z < kth, float("-inf"))
    p = s.softmax(-1)
    score = s + noise.float()
    if _ext is not None and p.dtype == torch.float32:  # the same check in C++ (csrc/sampling_cpu.cpp)
        tok, done = _ext.nucleus_argmax(p.contiguous(), score.contiguous(), top_p)
    else:
        tok, done = _nucleus_argmax(p, score, top_p)
    rest = (~done).nonzero()[:, 0]
    if len(rest):
        tok[rest] = _sorted_cut_argmax(logits[rest], p[rest], score[rest], noise[rest], temperature, top_k, top_p)
    return tok, (z.log_softmax(-1).gather(1, tok[:, None])[:, 0] if logprob else None)


def _nucleus_argmax(p, score, top_p: float, rounds: int = 16):
    """The reference's token per row, without a sort, where it is certain -> (token (B,), certain (B,) bool).

    The winner t of argmax(score) over the values left is the reference's token if t is in the top-p set.
    t is in it when the mass strictly above p_t, plus its ties, is below top_p; it is out when that mass
    reaches top_p, and so is every value <= p_t, which are then dropped before the next round. Either
    verdict must hold by more than the rounding of the reference's fp32 cumsum and of this fp32 sum, each
    at most V * 2^-24 over V values summing to 1 (margin: twice that). Rows with no certain verdict (a winner
    within that margin of the cut, non-finite values, or `rounds` rounds used) are left to the sorted cut."""
    B, V = p.shape
    tok = score.argmax(-1)
    done = torch.zeros(B, dtype=torch.bool)
    tol = V * 2.0 ** -22
    rows, pr, t = torch.arange(B), p, tok
    for _ in range(rounds):
        pt = pr.gather(1, t[:, None])
        above = pr.masked_fill(pr <= pt, 0.0).sum(-1)  # NaN p: NaN mass, neither verdict
        ties = (pr == pt).sum(-1) - 1  # tokens of the same value may come first in the reference's sort
        keep = (above + ties * pt[:, 0]) < top_p - tol
        out = above >= top_p + tol
        tok[rows[keep]] = t[keep]
        done[rows[keep]] = True
        if not bool(out.any()):
            break
        rows, pr, pt = rows[out], pr[out], pt[out]
        t = score[rows].masked_fill_(pr <= pt, float("-inf")).argmax(-1)
    return tok, done


def _sorted_cut_argmax(logits, p, score, noise, temperature: float, top_k: int, top_p: float):
    cut = _head_cut(p.numpy(), top_p)
    if cut is None:
        cut = _full_cut(p.numpy(), top_p)
    if cut is None:
        return sample_reference(logits, noise, temperature, top_k, top_p)[0]
    return score.masked_fill(p < cut, float("-inf")).argmax(-1)


def _cut_of(ps: torch.Tensor, top_p: float, real: torch.Tensor | None = None):
    """ps: each row's largest probabilities, descending (all V of them, or a head) -> the smallest kept one
    (B, 1), or None where the cut could differ from the reference's (a tie at the cut, a drop mask that is
    not a prefix, non-finite values). real: how many entries of a head row are real (the rest is padding)."""
    c = ps.cumsum(-1)  # a sequential scan per row: a head's prefix sums equal the full row's bit for bit
    drop = (c - ps) >= top_p
    k = (~drop).sum(-1, keepdim=True)  # kept count, >= 1
    W = ps.shape[1]
    cut = ps.gather(1, k - 1)
    nxt = ps.gather(1, k.clamp(max=W - 1))
    if ((k < W) & (nxt == cut)).any() or (drop[:, :-1] & ~drop[:, 1:]).any() or not torch.isfinite(c[:, -1]).all():
        return None
    if real is not None:
        # the kept values must lie in the head, and its mass must exceed top_p by more than rounding, so that
        # every value past it is dropped in the full row too (and, being <= 1/V < cut, ties no kept value)
        if (k > real).any() or (c.gather(1, real - 1) < top_p + 1e-6).any():
            return None
    return cut


def _full_cut(pn, top_p: float):
    import numpy as np
    return _cut_of(torch.from_numpy(np.sort(np.negative(pn), axis=-1)).neg_(), top_p)  # descending values


def _head_cut(pn, top_p: float):
    """_full_cut from each row's values above 1/V only (sorted in one flat pass): a trained model's
    distribution puts most of its mass there, so a few hundred values replace a sort of all V."""
    import numpy as np
    B, V = pn.shape
    mask = pn > 1.0 / V
    real = mask.sum(-1)
    W = int(real.max()) + 1
    if W > V // 4 or not np.isfinite(pn).all():
        return None
    rows, cols = np.nonzero(mask)  # row by row
    head = np.zeros((B, W), dtype=pn.dtype)  # negated values, packed to the left of each row; 0 pads
    head[rows, np.arange(len(rows)) - np.repeat(np.cumsum(real) - real, real)] = np.negative(pn[rows, cols])
    ps = torch.from_numpy(np.sort(head, axis=-1)).neg_()  # descending; the pads (-0.0 -> 0) sort last
    return _cut_of(ps, top_p, torch.from_numpy(real.astype(np.int64))[:, None])


@functools.lru_cache(maxsize=1)
def _kernel():
    """Triton is imported here, on the first GPU sample, so the CPU path runs where Triton is absent."""
    import triton
    import triton.language as tl

    @triton.jit
    def _sample_kernel(LOGITS, NOISE, TOK, LOGP, V, s_l, s_n, temperature, top_k, top_p,
                       GREEDY: tl.constexpr, USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(LOGITS + row * s_l + cols, mask=valid, other=float("-inf")).to(tl.float32)
        z = x / temperature
        zmax = tl.max(z, axis=0)
        e = tl.where(valid, tl.exp(z - zmax), 0.0)
        lse = zmax + tl.log(tl.sum(e, axis=0))
        keep = valid
        if USE_TOPK:
            lo = tl.min(tl.where(valid, z, float("inf")), axis=0)  # count(z >= lo) = V >= k
            hi = zmax + 1.0  # count(z >= hi) = 0 < k
            for _ in range(64):
                mid = (lo + hi) * 0.5
                ge = tl.sum(tl.where(valid & (z >= mid), 1, 0), axis=0) >= top_k
                lo = tl.where(ge, mid, lo)
                hi = tl.where(ge, hi, mid)
            keep = keep & (z >= lo)
        if USE_TOPP:
            ek = tl.where(keep, e, 0.0)
            p = ek / tl.sum(ek, axis=0)
            plo = 0.0
            phi = 2.0
            for _ in range(64):
                mid = (plo + phi) * 0.5
                ge = tl.sum(tl.where(p >= mid, p, 0.0), axis=0) >= top_p
                plo = tl.where(ge, mid, plo)
                phi = tl.where(ge, phi, mid)
            keep = keep & (p >= plo)
        if GREEDY:
            score = tl.where(valid, x, float("-inf"))
        else:
            g = tl.load(NOISE + row * s_n + cols, mask=valid, other=0.0).to(tl.float32)
            score = tl.where(keep, z + g, float("-inf"))
        best = tl.max(score, axis=0)
        tok = tl.min(tl.where(score == best, cols, BLOCK), axis=0)
        zt = tl.sum(tl.where(cols == tok, z, 0.0), axis=0)
        tl.store(TOK + row, tok.to(tl.int64))
        tl.store(LOGP + row, zt - lse)

    return _sample_kernel


def sample(logits, noise, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Same contract as sample_reference; logits may be a column slice (row stride kept)."""
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    greedy = temperature == 0
    if noise is None:
        if not greedy:
            raise ValueError("sampling with temperature > 0 needs gumbel noise")
        noise = logits  # never read
    elif noise.stride(-1) != 1:
        noise = noise.contiguous()
    tok = torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    use_k = (not greedy) and 0 < top_k < V
    use_p = (not greedy) and top_p < 1.0
    import triton
    _kernel()[(B,)](logits, noise, tok, logp, V, logits.stride(0), noise.stride(0),
                    1.0 if greedy else float(temperature), int(top_k), float(top_p),
                    GREEDY=greedy, USE_TOPK=use_k, USE_TOPP=use_p, BLOCK=triton.next_power_of_2(V))
    return tok, logp
