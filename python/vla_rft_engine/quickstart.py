"""`vla-rft quickstart`: the whole method on the built-in task, laptop-sized, resumable.

    vla-rft quickstart                                  # ~19 min on 2 CPU cores, writes runs/quickstart/
    vla-rft quickstart rft.grpo.steps=40 seeds=[0,1,2,3] eval_episodes=50

Stages (each skipped when already done, each also resumable inside; every stage is its own subcommand):
  demos        scripted-expert demos: `num_demos` clean ones (SFT data, RFT start states) and `wm_demos`
               wandering ones (random goals: the world model must see what actions it cannot guess do)
  tokenizer    vla-rft pretrain-tokenizer on all demo frames
  world_model  vla-rft pretrain-wm on `wm_train_demos` episodes whose goal is re-drawn every step, tokenized
  sft          vla-rft sft on the clean demos
  rft          vla-rft rft (R3 reward) from the SFT checkpoint, once per seed (side by side on a CPU: `workers`)
  evaluate     SFT and RFT policies in the real environment (not the world model): standard + perturbed
               settings, `eval_episodes` per (setting, seed); episodes never replay a training layout
  report       results.json, results.md (Tables 2-3 form), reward_curve.png, wm_rollout.png (world model
               beside the real rollout), action_distributions.png (Fig. 4)
Each stage's settings are a section of this config (tokenizer.*, world_model.*, sft.*, rft.*); the quickstart
fills in only their paths (out_dir, data, checkpoints). Defaults are sized for a 2-core CPU, not the paper.
"""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from .config import check_resume_config, parse_command, save_config, to_dict
from .quickstart_config import QuickstartConfig
from .rl.rft_config import RFTConfig
from .utils import RunDirLock, atomic_write_text

STAGES = ("demos", "tokenizer", "world_model", "sft", "rft", "evaluate", "report")
RUNTIME_KEYS = ("progress", "device", "workers")  # may change between a run and its resume


# ---- stages -------------------------------------------------------------------------------------
def _rft_rewards(cfg: RFTConfig, threads: int = 0) -> list[float]:
    """One seed's RFT run (in a worker process when threads > 0): its mean reward per step."""
    from .rl.rft import train
    if threads:
        import torch
        torch.set_num_threads(threads)
    return [h["reward/mean"] for h in train(cfg)["history"]]


def _scalars(res: dict) -> dict:
    """A stage's result as it goes into quickstart_state.json: its plain numbers and strings."""
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}


class Quickstart:
    def __init__(self, cfg: QuickstartConfig):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.paths = {"demos": self.out / "demos.pt", "demos_all": self.out / "demos_all.pt",
                      "demos_wm": self.out / "demos_wm.pt",
                      "tokenizer": self.out / "tokenizer", "world_model": self.out / "world_model",
                      "sft": self.out / "sft", "rft": self.out / "rft", "eval": self.out / "eval.json"}
        self.state_path = self.out / "quickstart_state.json"

    def _stage_cfgs(self):
        """The stage configs with the quickstart's paths filled in."""
        c, p = self.cfg, self.paths
        tok, wm, sft = copy.deepcopy(c.tokenizer), copy.deepcopy(c.world_model), copy.deepcopy(c.sft)
        tok.out_dir, tok.data, tok.device = str(p["tokenizer"]), str(p["demos_all"]), c.device
        tok.model.image_size = c.image_size
        wm_demos = p["demos_wm"] if c.wm_train_demos else p["demos_all"]
        wm.out_dir, wm.demos, wm.tokenizer, wm.segments, wm.device = (str(p["world_model"]), str(wm_demos),
                                                                      str(p["tokenizer"]), "", c.device)
        wm.progress = c.progress
        sft.out_dir, sft.data, sft.task, sft.image_size = str(p["sft"]), str(p["demos"]), c.task, c.image_size
        sft.progress, sft.device = c.progress, c.device
        return tok, wm, sft

    def rft_cfg(self, seed: int) -> RFTConfig:
        r = copy.deepcopy(self.cfg.rft)
        p = self.paths
        r.out_dir, r.seed = str(p["rft"] / f"seed{seed}"), seed
        r.tokenizer, r.world_model = str(p["tokenizer"]), str(p["world_model"] / "world_model")
        r.policy, r.demos, r.segments, r.action_ranges = str(p["sft"] / "ckpt.pt"), str(p["demos"]), "", ""
        r.progress, r.device = self.cfg.progress, self.cfg.device
        return r

    def stage_demos(self) -> dict:
        from .data.demos import collect_demos, save_demos
        c = self.cfg
        opts = c.env_options()  # the same rendering and dynamics for every stage's data and the evaluation
        clean = collect_demos(c.task, c.num_demos, seed=c.data_seed, image_size=c.image_size,
                              expert_noise=c.expert_noise, **opts)
        save_demos(clean, self.paths["demos"])
        both = clean
        if c.wm_demos:
            noisy = collect_demos(c.task, c.wm_demos, seed=c.data_seed + 1, image_size=c.image_size,
                                  expert_noise=c.wm_expert_noise, wander_every=c.wm_wander_every, **opts)
            both = {k: (np.concatenate([v, noisy[k]]) if isinstance(v, np.ndarray) else
                        v + noisy[k] if isinstance(v, list) else v) for k, v in clean.items()}
        save_demos(both, self.paths["demos_all"])
        if c.wm_train_demos:
            save_demos(collect_demos(c.task, c.wm_train_demos, seed=c.data_seed + 2, image_size=c.image_size,
                                     expert_noise=c.wm_expert_noise, wander_every=1, **opts), self.paths["demos_wm"])
        return {"clean_episodes": c.num_demos, "world_model_episodes": c.wm_demos,
                "expert_success": float(np.mean(clean["success"]))}

    def stage_tokenizer(self) -> dict:
        from .train.tokenizer import train
        return _scalars(train(self._stage_cfgs()[0]))

    def stage_world_model(self) -> dict:
        from .train.world_model import train
        return train(self._stage_cfgs()[1])

    def stage_sft(self) -> dict:
        from .train.sft import train
        return _scalars(train(self._stage_cfgs()[2]))

    def rft_workers(self) -> int:
        """Processes for the RFT seeds. On the CPU one per seed, up to twice the cores: the decode steps are too
        small to keep two threads busy (3 seeds on 2 cores: 3 one-thread processes took 120 s where one
        two-thread process took 153 s, and 2 processes 144 s). On a GPU one."""
        import torch
        cpu = self.cfg.device == "cpu" or (self.cfg.device == "auto" and not torch.cuda.is_available())
        w = self.cfg.workers or (min(len(self.cfg.seeds), 2 * (os.cpu_count() or 1)) if cpu else 1)
        return max(1, min(w, len(self.cfg.seeds)))

    def stage_rft(self) -> dict:
        cfgs, workers = [self.rft_cfg(s) for s in self.cfg.seeds], self.rft_workers()
        if workers == 1:
            rewards = [_rft_rewards(c) for c in cfgs]
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            for c in cfgs[1:]:
                c.progress = False  # one bar: the first seed's
            print(f"[quickstart] rft: {len(cfgs)} seeds in {workers} processes of {threads} thread(s)", flush=True)
            with mp.get_context("spawn").Pool(workers) as pool:
                rewards = pool.starmap(_rft_rewards, [(c, threads) for c in cfgs])
        out = {}
        for s, R in zip(self.cfg.seeds, rewards):
            k = max(1, len(R) // 4)
            out[f"seed{s}"] = {"steps": len(R), "reward_first": float(np.mean(R[:k])), "reward_last": float(np.mean(R[-k:]))}
        return out

    def stage_evaluate(self) -> dict:
        from .evaluation import evaluate_checkpoints
        c = self.cfg
        ckpts = {"sft": self.paths["sft"] / "ckpt.pt"}
        ckpts.update({f"rft_seed{s}": self.paths["rft"] / f"seed{s}" / "ckpt.pt" for s in c.seeds})
        res = evaluate_checkpoints(ckpts, c.task, c.settings, c.seeds, c.eval_episodes, c.eval_seed, c.image_size,
                                   cache=self.paths["eval"], progress=c.progress, env_options=c.env_options(),
                                   workers=c.workers or min(8, os.cpu_count() or 1))  # the policies run on the CPU
        return {"evaluations": len(res)}

    def stage_report(self) -> dict:
        from .evaluation import write_report
        return write_report(self)

    # ---- driver ---------------------------------------------------------------------------------
    def artifacts(self, stage: str) -> list[Path]:
        """The files a finished stage leaves (a resume redoes the stage when one is gone)."""
        p = self.paths
        return {"demos": [p["demos"], p["demos_all"]] + ([p["demos_wm"]] if self.cfg.wm_train_demos else []),
                "tokenizer": [p["tokenizer"] / "tokenizer.safetensors"],
                "world_model": [p["world_model"] / "world_model" / "config.json"], "sft": [p["sft"] / "ckpt.pt"],
                "rft": [p["rft"] / f"seed{s}" / "ckpt.pt" for s in self.cfg.seeds], "evaluate": [p["eval"]],
                "report": [self.out / "results.json", self.out / "results.md"]}[stage]

    def run(self) -> dict:
        with RunDirLock(self.out):  # one quickstart per out_dir (each stage also locks its own folder)
            return self._run()

    def _run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        check_resume_config(state.get("config"), self.cfg, self.out, RUNTIME_KEYS, "or delete the directory")
        state["config"] = to_dict(self.cfg)
        state.setdefault("stages", {})
        save_config(self.cfg, self.out / "quickstart.yaml")
        t_all = time.time()
        for i, name in enumerate(STAGES):
            missing = [str(f) for f in self.artifacts(name) if not f.exists()]
            if name in state["stages"] and missing:
                print(f"[quickstart] {name}: {missing[0]} is missing, redoing this stage and the ones after it")
                for later in STAGES[i:]:
                    state["stages"].pop(later, None)
            if name in state["stages"]:
                print(f"[quickstart {i + 1}/{len(STAGES)}] {name}: done earlier, skipped", flush=True)
                continue
            print(f"[quickstart {i + 1}/{len(STAGES)}] {name} ...", flush=True)
            t0 = time.time()
            result = getattr(self, f"stage_{name}")()
            state["stages"][name] = {"wall_s": round(time.time() - t0, 1), "result": result}
            # atomic: a killed run redoes at most the stage it was in
            atomic_write_text(self.state_path, json.dumps(state, indent=1, default=str))
            print(f"[quickstart {i + 1}/{len(STAGES)}] {name}: {state['stages'][name]['wall_s']} s", flush=True)
        state["this_run_s"] = round(time.time() - t_all, 1)
        atomic_write_text(self.state_path, json.dumps(state, indent=1, default=str))
        return state


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command("quickstart", QuickstartConfig, QuickstartConfig.expand_argv(list(argv or [])))
    if cfg is None:
        return 0
    state = Quickstart(cfg).run()
    md = Path(cfg.out_dir) / "results.md"
    if md.is_file():
        print(md.read_text())
    total = sum(s["wall_s"] for s in state["stages"].values())
    print(f"quickstart: this run {state['this_run_s']:.0f} s; stage times when each ran "
          f"{json.dumps({k: v['wall_s'] for k, v in state['stages'].items()})} (sum {total:.0f} s); "
          f"outputs in {cfg.out_dir}")
    return 0


__all__ = ["QuickstartConfig", "Quickstart", "main", "STAGES"]
