"""`vla-rft rft`: Stage II, GRPO fine-tuning of the SDE policy inside the frozen world model (Eq. 5-13).

    vla-rft rft tokenizer=T/ world_model=W/world_model policy=P/ckpt.pt demos=P/demos.pt segments=seg.pt
    torchrun --nproc_per_node=K -m vla_rft_engine.cli rft ...          (NCCL on GPUs, gloo on CPU processes)

One step (S = grpo.task_instances start states, N = grpo.rollouts; Table 7: 16 x 16):
  1. draw S start states from the demos (o_t, l, s_t, dataset chunk a_{t:t+C}); rank r takes a contiguous shard
  2. per block of `states_per_block` start states, one RNG stream seeded by (seed, step, first global index):
     encode   f_VLM once per start state -> z
     sde      N SDE chunks per start state (Eq. 5-8), log-probs kept
     wm       ONE LearnedWorld.imagine call for the block (models/world.py): N + M + 1 rollouts per start state,
              the N policy chunks, M re-samples of chunk 0 (world-model noise, diagnostics only) and, last, the
              dataset chunk (R3's reference). ctx(o_t) + dyn(o_t) is shared by the group; each rollout's prompt
              ends with its OWN a_0 (Eq. 10), so the policy's first action reaches the reward
     reward   verified reward (Eq. 11; R3 default, R1/R2 selectable)
     signal   is the reward about the actions? in-group Spearman(R, -|a - a_ref|_1), in-group R std vs the
              std over re-samples of one chunk (logged as signal/*)
  3. group advantage (Eq. 12); GRPO update (Eq. 9, 13) of the action head and Sigma Net (separate lrs, encoder
     and WM frozen) with the flow MSE on dataset actions, entropy bonus, grad clip, ppo epochs x minibatches.

Reproducibility: every random draw comes from generators seeded by (seed, step, ...), so a resumed run repeats
an uninterrupted one bit-for-bit, and a run on W ranks equals one on 1 rank whenever states_per_block divides
S / W (minibatch m = the start states with global index % minibatches == m; DDP averages equal-sized shards);
the update then differs only by float reduction order (the tests use rtol 1e-4).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn

from ..config import ConfigError, Diverged, UserError, parse_command, save_config, to_dict
from ..metrics import spearman
from ..utils import RunLogger, atomic_save, load_checkpoint, nvtx_range
from .. import distributed as du
from .grpo import group_advantage, grpo_loss, lr_lambdas, optimizer_param_groups, policy_kl
from .rewards import verified_reward
from .rft_config import CKPT_FORMAT, RFTConfig, config_hash, hashed_fields

PHASES = ("encode", "sde", "wm_rollout", "reward", "update")


class PolicyHeads(nn.Module):
    """The trainable part (action head + Sigma Net) as one module, so DDP / FSDP2 wrap exactly it.
    per_element (grpo.ratio_level=element): log-probs and entropies per action element, not per rollout;
    logprob_reduce: grpo.logprob_reduce (Eq. 8 over the K steps)."""

    def __init__(self, policy, per_element: bool = False, logprob_reduce: str = "mean"):
        super().__init__()
        self.flow_head, self.sigma_net = policy.flow_head, policy.sigma_net
        self.__dict__["policy"] = policy  # not a submodule: the frozen encoder stays out of DDP/FSDP
        self.per_element, self.logprob_reduce = per_element, logprob_reduce

    def forward(self, chain, z, s, actions=None, tau=None, noise=None):
        out = self.policy.log_prob(chain, z, s, per_element=self.per_element, logprob_reduce=self.logprob_reduce)
        mse = None if actions is None else self.policy.flow_loss(z, s, actions, tau=tau, noise=noise, reduction="none")
        if self.per_element:
            return out["element_log_prob"], out["element_entropy"], mse
        return out["log_prob"], out["entropy"], mse


class RFTRun:
    """Models, optimizer and one RFT step; `step(i)` is the whole loop body (also used by bench/grpo_step.py)."""

    def __init__(self, cfg: RFTConfig, d: du.Dist, policy, world, pool, lpips_model=None):
        self.cfg, self.d, self.policy, self.world, self.pool = cfg, d, policy, world, pool
        self.lpips = lpips_model
        g = cfg.grpo
        if g.task_instances % d.world or (g.task_instances // d.world) % cfg.states_per_block:
            raise ConfigError(f"grpo.task_instances={g.task_instances} start states must split evenly over "
                              f"{d.world} ranks into blocks of states_per_block={cfg.states_per_block}")
        if (g.task_instances // d.world) % g.minibatches:
            raise ConfigError(f"each rank's {g.task_instances // d.world} start states must split evenly into "
                              f"grpo.minibatches={g.minibatches}")
        if len(pool) < g.task_instances:
            raise ConfigError(f"the demos give {len(pool)} start states, fewer than grpo.task_instances={g.task_instances}")
        if pool.chunks.shape[-1] != policy.cfg.action_dim or pool.proprio.shape[-1] != policy.cfg.proprio_dim:
            raise ValueError(f"demos {cfg.demos} hold {pool.chunks.shape[-1]}-D actions and {pool.proprio.shape[-1]}-D "
                             f"proprio, the policy takes {policy.cfg.action_dim}-D and {policy.cfg.proprio_dim}-D; "
                             "use the demos the policy was trained on")
        if policy.cfg.action_dim != world.action_dim:
            raise ValueError(f"the policy acts in {policy.cfg.action_dim} dims, the world model's actions have "
                             f"{world.action_dim}; pair a policy and a world model trained on the same data")
        policy.encoder.requires_grad_(False)  # frozen in Stage II (VLM frozen)
        policy.eval()  # no dropout: sampling and the update see the same networks
        self.heads = du.wrap(PolicyHeads(policy, g.ratio_level == "element", g.logprob_reduce), d, cfg.distributed)
        base = cast(PolicyHeads, du.unwrap(self.heads))
        self.opt = torch.optim.AdamW(optimizer_param_groups(base.flow_head.parameters(), base.sigma_net.parameters(),
                                                            g))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambdas(g))
        self.params = [p for grp in self.opt.param_groups for p in grp["params"]]
        self.phase_mem: dict | None = None  # bench: set to {} to record CUDA peak bytes per phase

    @contextmanager
    def phase(self, name: str, timings: dict):
        """NVTX range per phase; wall time per phase where it is cheap to measure: on the CPU, or on CUDA only
        with profile=true (it synchronises the device around each phase, which production runs must not)."""
        cuda = self.d.device.type == "cuda"
        if cuda and not self.cfg.profile:
            with nvtx_range(f"rft.{name}"):
                yield
            return
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if cuda and self.phase_mem is not None:
            torch.cuda.reset_peak_memory_stats(self.d.device)
        t0 = time.perf_counter()
        with nvtx_range(f"rft.{name}"):
            yield
        sync()
        timings[name] += time.perf_counter() - t0
        if cuda and self.phase_mem is not None:
            self.phase_mem[name] = max(self.phase_mem.get(name, 0), torch.cuda.max_memory_allocated(self.d.device))

    def start_states(self, step: int) -> torch.Tensor:
        """Global start-state pool indices of a step: the same on every rank."""
        g = du.generator(torch.device("cpu"), self.cfg.seed, step, 1 << 30)
        return torch.randperm(len(self.pool), generator=g)[:self.cfg.grpo.task_instances]

    @torch.no_grad()
    def rollout_block(self, step: int, first: int, pool_idx: torch.Tensor, timings: dict) -> dict:
        """Encode -> SDE -> imagine -> reward for one block of start states (global indices first..)."""
        cfg, dev, N, M, pol = self.cfg, self.d.device, self.cfg.grpo.rollouts, self.cfg.noise_rows, self.policy
        design = cfg.reward.design
        gen = du.generator(dev, cfg.seed, step, first)
        b = self.pool.get(pool_idx)
        k = len(pool_idx)
        with self.phase("encode", timings):
            proprio = b["proprio"].to(dev)
            z = pol.encode(b["policy_image"].to(dev), b["instruction"], proprio)
            s = pol.normalize_proprio(proprio)
            img = b["image"].to(dev)
        with self.phase("sde", timings):
            out = pol.sample_sde(z, s, N, generator=gen, logprob_reduce=cfg.grpo.logprob_reduce)
        actions = pol.unnormalize_actions(out.actions)  # (k, N, C, A) raw
        ref = b["ref_actions"].to(dev)
        frames = None
        if design != "r1":
            with self.phase("wm_rollout", timings):  # policy chunks, M re-samples of chunk 0, the reference last
                chunks = torch.cat([actions, actions[:, :1].expand(k, M, *actions.shape[2:]), ref[:, None]], 1)
                frames = self.world.imagine(img, chunks, temperature=cfg.wm_temperature, top_p=cfg.wm_top_p,
                                            top_k=cfg.wm_top_k, generator=gen, guidance=cfg.wm_guidance).float()
        with self.phase("reward", timings):
            R, R_noise = self._reward(step, pool_idx, actions, ref, frames, b)
        E, (C, A) = cfg.grpo.ppo_epochs, pol.chunk_shape
        from ..models.policy import sample_beta  # flow-MSE draws, one per (start state, epoch)
        alpha, beta = pol.flow_tau  # the law the policy was trained with (SFT)
        tau = sample_beta(alpha, beta, k * E, gen, dev).view(k, E)
        noise = torch.randn(k, E, C, A, generator=gen, device=dev)
        dist = (actions - ref[:, None]).abs().sum((2, 3))  # (k, N): the chunk's L1 distance to the dataset chunk
        return {"z": z, "s": s, "chain": out.chain, "R": R.float(), "sigma": out.sigmas.mean((1, 2, 3, 4)),
                "ref_norm": pol.normalize_actions(ref).clamp(-1, 1), "tau": tau, "noise": noise,
                "frames": None if frames is None else torch.cat([frames[:, :N], frames[:, -1:]], 1), "start": img,
                "rho": spearman(R.float(), -dist), "noise_std": R_noise.std(-1) if R_noise is not None else None}

    def _reward(self, step, pool_idx, actions, ref, frames, b):
        """Verified reward (Eq. 11) of the N policy rollouts, and of chunk 0 with its M re-samples (or None)."""
        cfg, N, M, dev = self.cfg, self.cfg.grpo.rollouts, self.cfg.noise_rows, self.d.device
        design = cfg.reward.design

        def reward(pf):
            if design == "r1":
                return verified_reward(cfg.reward, policy_actions=actions, dataset_actions=ref[:, None])
            if design == "r3":
                return verified_reward(cfg.reward, lpips_model=self.lpips, policy_frames=pf,
                                       wm_reference_frames=frames[:, -1:])
            return verified_reward(cfg.reward, lpips_model=self.lpips, policy_frames=pf,
                                   dataset_frames=b["next_frames"].to(dev)[:, None])
        try:
            R = reward(None if frames is None else frames[:, :N])
            R_noise = reward(torch.cat([frames[:, :1], frames[:, N:N + M]], 1)) if frames is not None and M else None
        except ValueError as e:
            raise ValueError(f"step {step}, start states {pool_idx.tolist()}: {e}") from e
        if not torch.isfinite(R).all():
            raise Diverged(f"step {step}: NaN/inf verified reward for start states {pool_idx.tolist()} "
                           f"(rewards {R.tolist()}); check the world model and tokenizer outputs")
        return R, R_noise

    def update(self, roll: dict, adv: torch.Tensor, first: int) -> dict:
        """GRPO epochs x minibatches over this rank's start states (global index first..)."""
        g, d = self.cfg.grpo, self.d
        L = adv.shape[0]
        with torch.no_grad():  # old log-probs by the update's own code path: r = 1 before the first step
            old = du.unwrap(self.heads)(roll["chain"], roll["z"], roll["s"])[0]
        sums: dict = defaultdict(float)
        n = 0
        for e in range(g.ppo_epochs):
            for m in range(g.minibatches):
                sel = torch.tensor([i for i in range(L) if (first + i) % g.minibatches == m], device=adv.device)
                lp, ent, mse = self.heads(roll["chain"][sel], roll["z"][sel], roll["s"][sel], roll["ref_norm"][sel],
                                          roll["tau"][sel, e], roll["noise"][sel, e])
                kl = du.scalar_mean(d, policy_kl(lp.detach(), old[sel], g.mse_kl_estimator)) if g.mse_kl_gate else None
                loss, met = grpo_loss(lp, old[sel], adv[sel], entropy=ent, mse=mse, cfg=g, kl=kl)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.params, g.grad_clip)
                if not torch.isfinite(torch.as_tensor(gn)):
                    raise Diverged(f"non-finite gradient norm {float(gn)} in the GRPO update; nothing from this step "
                                   "was applied or saved: lower grpo.lr / grpo.sigma_lr and resume")
                self.opt.step()
                for key in ("loss", "pg_loss", "ratio_mean", "clip_frac", "approx_kl_k3", "approx_kl_k1", "entropy",
                            "mse", "mse_weight", "dual_clip_frac"):
                    sums[key] += met[key]
                sums["grad_norm"] += float(gn)
                n += 1
        self.sched.step()
        return {f"update/{k}": v / n for k, v in sums.items()}

    def step(self, step: int) -> tuple[dict, dict | None]:
        """One RFT step. -> (metrics reduced over ranks, viz data on rank 0 or None)."""
        cfg, d, S, k = self.cfg, self.d, self.cfg.grpo.task_instances, self.cfg.states_per_block
        L = S // d.world
        first = d.rank * L
        idx = self.start_states(step)
        timings: dict = defaultdict(float)
        t0 = time.perf_counter()
        blocks = [self.rollout_block(step, f, idx[f:f + k], timings) for f in range(first, first + L, k)]
        roll: dict[str, Any] = {key: (torch.cat([b[key] for b in blocks]) if blocks[0][key] is not None else None)
                                for key in blocks[0]}  # tensors; "frames" and "noise_std" may be None
        rho = du.all_gather_rows(d, roll["rho"][:, None])[:, 0]  # NaN where a group's rewards are all equal
        adv = group_advantage(roll["R"], cfg.grpo.normalize_adv_std, cfg.grpo.adv_eps)  # (L, N), per group
        with self.phase("update", timings):
            up = self.update(roll, adv, first)
        R_all = du.all_gather_rows(d, roll["R"])  # (S, N) in global start-state order
        A_all = du.all_gather_rows(d, adv)
        metrics = {"reward/mean": R_all.mean().item(), "reward/std": R_all.std().item(),
                   "reward/max": R_all.max().item(), "reward/min": R_all.min().item(),
                   "reward/group_std": R_all.std(-1).mean().item(), "adv/abs_mean": A_all.abs().mean().item(),
                   "adv/std": A_all.std().item(), "reward/lpips_used": float(self.lpips is not None),
                   "signal/spearman_reward_vs_action": rho.nanmean().item() if (~rho.isnan()).any() else float("nan"),
                   "lr/action_head": self.opt.param_groups[0]["lr"], "lr/sigma": self.opt.param_groups[1]["lr"]}
        extra = {"signal/wm_noise_std": roll["noise_std"].mean().item()} if roll["noise_std"] is not None else {}
        metrics.update(du.all_mean(d, {**up, "sigma/mean": roll["sigma"].mean().item(), **extra}))
        timings["step"] = time.perf_counter() - t0
        timed = (*PHASES, "step") if d.device.type != "cuda" or cfg.profile else ("step",)  # see phase()
        metrics.update(du.all_max(d, {f"time/{p}": timings[p] for p in timed}))
        viz = None
        if d.is_main and roll["frames"] is not None:
            viz = {"frames": roll["frames"][0].cpu(), "R": roll["R"][0].cpu(), "start": roll["start"][0].cpu()}
        return metrics, viz

    def save(self, path: Path, step: int, history: list) -> None:
        model_sd, opt_sd = du.full_state(self.policy, self.opt, du.unwrap(self.heads), self.cfg.distributed, self.d)
        if self.d.is_main:
            atomic_save({"format": CKPT_FORMAT, "model": model_sd, "optimizer": opt_sd,
                         "scheduler": self.sched.state_dict(), "step": step, "config": to_dict(self.cfg),
                         "config_hash": config_hash(self.cfg), "policy_config": to_dict(self.policy.cfg),
                         "norm_stats": self.policy.norm_stats(), "flow_tau": self.policy.flow_tau, "metrics": history,
                         "image_size": self.policy.image_size,
                         "rng": {"cpu": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}, path)
            from ..train.sft import POLICY_WEIGHTS, save_policy_weights  # the deployable policy, no pickle
            save_policy_weights(self.policy, path.parent / POLICY_WEIGHTS, step, state=model_sd)
        du.barrier(self.d)

    def load(self, path: Path) -> tuple[int, list]:
        ck = load_checkpoint(path, "RFT checkpoint", map_location="cpu")
        if ck.get("format") != CKPT_FORMAT:
            raise ValueError(f"{path} is not an RFT checkpoint (format={ck.get('format')!r})")
        if ck.get("config_hash") != config_hash(self.cfg):
            # settings added since the checkpoint was written read as their defaults (which keep the old behaviour)
            old, new = hashed_fields(_cfg_from(ck["config"])), hashed_fields(self.cfg)
            diff = [f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            if diff:
                raise ConfigError(f"{path} was written by a run with a different config ({'; '.join(diff)}); "
                                  "use a new out_dir, resume=false, or the checkpoint's settings")
        du.load_full_state(self.policy, self.opt, du.unwrap(self.heads), self.cfg.distributed, self.d,
                           ck["model"], ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["cpu"])
        if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        return int(ck["step"]), list(ck["metrics"])


def _cfg_from(d: dict) -> RFTConfig:
    from ..config import from_dict
    d = dict(d)
    if "weight_decay" in d:  # runs from before grpo.weight_decay: one decay for both groups
        wd = d.pop("weight_decay")
        d["grpo"] = {"weight_decay": wd, "sigma_weight_decay": wd, **d.get("grpo", {})}
    return from_dict(RFTConfig, d)


def build(cfg: RFTConfig, d: du.Dist) -> RFTRun:
    """Load every Stage I artefact (clear errors naming the missing file and the command that makes it)."""
    from .rft_data import StartStates, load_sft_policy, load_world, require
    dev = d.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.wm_dtype, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    world = load_world(cfg, dev, dtype)
    policy = load_sft_policy(cfg.policy, dev)
    # before the optimizer and any resume (a resumed run loads its trained Sigma Net over it)
    policy.restart_sigma(cfg.sigma_min, cfg.sigma_max, cfg.sigma_init)
    from ..data.demos import load_demos
    pool = StartStates(load_demos(require(cfg.demos, "demos")), policy.cfg.chunk_len, world.image_size)
    policy.image_size = int(pool.frames.shape[2])  # the policy sees the demos' frames (RFT's start states)
    lp = None
    if cfg.reward.design != "r1" and cfg.reward.lambda_lp > 0:
        from .rewards import _resolve_lpips  # fail at start-up, not at step 1, when LPIPS weights are missing
        lp = _resolve_lpips(cfg.reward, dev)
    return RFTRun(cfg, d, policy, world, pool, lp)


def train(cfg: RFTConfig, run: RFTRun | None = None) -> dict:
    with du.session(cfg.device, cfg.out_dir, None if run is None else run.d) as d:
        return _train(cfg, d, run)


def _train(cfg: RFTConfig, d: du.Dist, run: RFTRun | None) -> dict:
    run = run or build(cfg, d)
    out = Path(cfg.out_dir)
    ckpt, step = out / "ckpt.pt", 0
    history: list = []
    if cfg.resume and ckpt.is_file():
        step, history = run.load(ckpt)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger = RunLogger(out, resume_step=step) if d.is_main else None
    end = min(cfg.grpo.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.grpo.steps
    bar = None
    if cfg.progress and d.is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.grpo.steps, initial=step, desc="rft", dynamic_ncols=True)
    flat = 0  # steps in a row where every group's rewards were all equal (no advantage, no update signal)
    while step < end:
        metrics, viz = run.step(step)
        step += 1
        history.append({"step": step, **metrics})
        if logger and (step % cfg.log_every == 0 or step == end):
            logger.log(step, metrics)
        if viz is not None and cfg.image_every > 0 and step % cfg.image_every == 0:
            save_rollout_png(viz, out / "rollouts" / f"step_{step:05d}.png")
        flat = flat + 1 if metrics["reward/group_std"] == 0 else 0
        if flat == 1:
            warnings.warn(f"rft step {step}: every group's rollouts got the same reward, so the step had no signal; "
                          "the world model may ignore the actions or emit constant frames")
        if cfg.max_flat_steps and flat >= cfg.max_flat_steps:
            raise UserError(f"rft stopped at step {step}: {flat} steps in a row with equal rewards within every group "
                            "(no learning signal). Check the world model with `vla-rft wm-eval` (action swap) and "
                            "its pairing with the tokenizer; max_flat_steps=0 disables this stop")
        if step % cfg.ckpt_every == 0 or step == end:
            run.save(ckpt, step, history)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(R=f"{metrics['reward/mean']:.4f}", R_std=f"{metrics['reward/group_std']:.4f}",
                            rho=f"{metrics['signal/spearman_reward_vs_action']:.2f}")
    if bar is not None:
        bar.close()
    if logger:
        logger.close()
        if history:
            from ..viz import save_curve
            save_curve([h["step"] for h in history], {"reward/mean": [h["reward/mean"] for h in history]},
                       out / "reward_curve.png", title="RFT mean verified reward")
    return {"step": step, "history": history}


def save_rollout_png(viz: dict, path: Path) -> None:
    """Rows: the reference rollout (dataset actions), the best and the worst sampled rollout; o_t first."""
    from ..viz import save_frame_grid
    f, R, start = viz["frames"], viz["R"], viz["start"][None]
    best, worst = int(R.argmax()), int(R.argmin())
    save_frame_grid([torch.cat([start, f[-1]]), torch.cat([start, f[best]]), torch.cat([start, f[worst]])], path,
                    labels=["reference", f"best {R[best]:.3f}", f"worst {R[worst]:.3f}"],
                    col_labels=["o_0"] + [f"t={t}" for t in range(1, f.shape[1] + 1)],
                    title=f"{path.stem}: world-model rollouts under the dataset chunk (reference) and the sampled "
                          "chunks with the highest / lowest verified reward")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command("rft", RFTConfig, argv)
    if cfg is None:
        return 0
    try:
        res = train(cfg)
    except FileNotFoundError as e:  # a missing stage checkpoint: one clear line from the CLI, exit 2
        raise ConfigError(str(e)) from None
    if res["history"] and int(os.environ.get("RANK", "0")) == 0:
        last = res["history"][-1]
        print(json.dumps({"step": res["step"], **{k: round(v, 6) for k, v in last.items() if k != "step"}}))
    return 0


__all__ = ["RFTConfig", "RFTRun", "PolicyHeads", "build", "train", "main", "config_hash", "save_rollout_png"]
