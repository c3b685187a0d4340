"""SDE sampling step (Eq. 5-7): fused Triton Euler/log-prob kernel vs eager PyTorch (torch.distributions.Normal).

Shape: the paper's RFT batch, 16 start states x 16 samples = 256 chunks of 8 x 7, K = 10 steps.
Times (median of repeats, NVTX ranges around each variant):
  step_*        one Euler-Maruyama step + log-prob + entropy over all 256 chunks (the op the kernel fuses)
  chain_*       the K = 10 steps of that op back to back (networks replaced by fixed tensors)
  sample_torch  a full policy.sample_sde (tiny default-sized policy), for scale: the networks dominate
  logprob_*     the training-side log-prob over the whole chain, forward + backward
On the CPU only the torch path is a speed path; Triton runs in the interpreter (TRITON_INTERPRET=1),
timed once here for completeness, never as a speed claim. GPU target: step ratio eager/fused >= 3.

    python bench/sde_sampling.py [--out bench/results/sde_sampling_cpu.json] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # last: kernels/ must not shadow PyPI kernels
from bench.common import device_name, emit, parse_args, time_fn  # noqa: E402

B, N, T, A, K = 16, 16, 8, 7, 10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parse_args(ap, argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from vla_rft_engine.kernels.sde_euler_step import euler_step_reference, euler_step_triton, triton_usable
    from vla_rft_engine.kernels.sde_log_prob import FusedSDELogProb, log_prob_reference
    from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy
    from vla_rft_engine.utils import nvtx_range

    torch.manual_seed(0)
    M = B * N
    a, v, eps = (torch.randn(M, T, A, device=dev) for _ in range(3))
    sigma = torch.rand(M, T, A, device=dev) * 0.1 + 0.01
    vs = torch.randn(K, M, T, A, device=dev)
    es = torch.randn(K, M, T, A, device=dev)
    on_gpu = dev.type == "cuda"
    rep = args.repeats

    def chain(step_fn):
        def run():
            x = a
            for k in range(K):
                x, lp, ent = step_fn(x, vs[k], sigma, es[k], 1.0 / K)
            return x
        return run

    def timed(name, fn, repeats=rep, warmup=2):
        with nvtx_range(name):
            return time_fn(fn, repeats=repeats, warmup=warmup, device=dev)["median_s"]

    rec = {"bench": "sde_sampling", "device": device_name(dev), "torch": torch.__version__,
           "shape": {"start_states": B, "samples": N, "chunk_len": T, "action_dim": A, "K": K, "rows": M},
           "dtype": "float32"}
    rec["step_torch_median_s"] = timed("step_torch", lambda: euler_step_reference(a, v, sigma, eps, 0.1))
    rec["chain_torch_median_s"] = timed("chain_torch", chain(euler_step_reference))

    # log-prob over the whole chain (B*N*K rows), forward + backward, as in the GRPO update
    x = torch.randn(M * K, T, A, device=dev)
    ins = [t.requires_grad_() for t in (x, torch.randn_like(x), torch.randn_like(x), torch.rand_like(x) * 0.1 + 0.01)]

    def lp_bwd(fn):
        def run():
            lp, ent = fn(*ins, 0.1)
            (lp.sum() + ent.sum()).backward()
        return run
    rec["logprob_fwd_bwd_torch_median_s"] = timed("logprob_torch", lp_bwd(log_prob_reference))

    pol = VLAPolicy(PolicyConfig(backend="torch")).to(dev).eval()
    z, s = torch.randn(B, pol.encoder.z_dim, device=dev), torch.randn(B, 8, device=dev)
    gen = torch.Generator(device=dev)
    rec["sample_torch_median_s"] = timed("sample_sde_torch", lambda: pol.sample_sde(z, s, N, generator=gen.manual_seed(0)),
                                         repeats=max(3, rep // 4), warmup=1)

    if triton_usable(dev):
        r = rep if on_gpu else 3
        rec["step_triton_median_s"] = timed("step_triton", lambda: euler_step_triton(a, v, sigma, eps, 0.1), r, 1)
        rec["chain_triton_median_s"] = timed("chain_triton", chain(euler_step_triton), r, 1)
        rec["logprob_fwd_bwd_triton_median_s"] = timed("logprob_triton", lp_bwd(FusedSDELogProb.apply), r, 1)
        if on_gpu:
            pol.cfg.backend = "triton"
            rec["sample_triton_median_s"] = timed(
                "sample_sde_triton", lambda: pol.sample_sde(z, s, N, generator=gen.manual_seed(0)), max(3, rep // 4), 1)
        rec["step_ratio_eager_over_fused"] = rec["step_torch_median_s"] / rec["step_triton_median_s"]
        rec["chain_ratio_eager_over_fused"] = rec["chain_torch_median_s"] / rec["chain_triton_median_s"]
        rec["logprob_ratio_eager_over_fused"] = (rec["logprob_fwd_bwd_torch_median_s"]
                                                 / rec["logprob_fwd_bwd_triton_median_s"])
    rec["triton_mode"] = "compiled (GPU)" if on_gpu else ("interpreter" if triton_usable(dev) else "unavailable")
    rec["note"] = ("GPU target: step_ratio_eager_over_fused >= 3." if on_gpu else
                   "CPU: the torch path is the speed path; Triton ran in the interpreter (TRITON_INTERPRET=1), "
                   "a correctness tool, so the *_triton times and ratios here are NOT speed results. "
                   "CPU shared with other jobs (2 cores): absolute times are noisy.")
    emit(rec, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
