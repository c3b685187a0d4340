"""`vla-rft quickstart` settings (quickstart.py): each stage's config with the quickstart's defaults. No torch
import, so the CLI checks them fast."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .config import ConfigError, flat_dict, to_dict
from .rl.rft_config import RFTConfig
from .train.sft_config import SFTConfig
from .train.tokenizer_config import TokenizerTrainConfig
from .train.world_model_config import WMTrainConfig


# Named runs ship as presets in vla_rft_engine/configs/ (`--config NAME`): smoke (every stage in about two
# minutes; `--smoke` is its short form), validation (the episodes settings are chosen on), r1_control (the R1
# control, which never runs the world model).


def _tokenizer() -> TokenizerTrainConfig:
    # 1500 steps, not 300: at 300 the objects and the gripper decode as blurs (held-out PSNR 26 dB), at 1500
    # they are sharp (31 dB) and the world model's frames go from 25 to 29 dB (bench/results/wm_action_sensitivity)
    t = TokenizerTrainConfig(steps=1500, eval_every=500, ckpt_every=250, eval_pairs=64)
    t.model.levels = [8, 6, 5]  # 240 codes, not 4375: a CPU-sized world model sees each code often enough
    return t


def _world_model() -> WMTrainConfig:
    # Chosen on the validation episodes: the actions also enter as a projection of the last action block and of
    # the sum of all blocks so far (action_cond, action_cond_sum). On the plain token conditioning this CPU-sized
    # model followed the actions weakly (moving-pixel own/swapped ratio 0.97, in-group Spearman of R3 0.13); with
    # both, 0.68 and 0.40 (bench/results/wm_action_sensitivity_cpu.json, runs_2026_12_06_session7)
    return WMTrainConfig(preset="tiny", steps=3000, batch_size=8, lr=2e-3, change_weight=5.0, ckpt_every=500,
                         action_cond=True, action_cond_sum=True)


def _sft() -> SFTConfig:
    return SFTConfig(steps=500, eval_every=250, ckpt_every=100)


def _rft() -> RFTConfig:
    r = RFTConfig(ckpt_every=5, image_every=5, states_per_block=4)  # one WM call per step: batched rows
    # Chosen on the validation episodes (eval_seed=50000). Greedy world model: at temperature 1 its sampling
    # noise (reward std 0.0074 over re-samples of one chunk) matched the in-group std (0.0087) and the reward
    # ranked chunks at random (Spearman -0.01); greedy, the noise is 0. Sigma restarted at 0.1 so the group's
    # chunks differ; lrs as the R1 control found (1e-4 on the action head hurt, 3e-5 too). 4 start states per
    # step (+0.7 points on validation, [-1.7, +3.0]): 8 (+1.3, [-1.7, +4.3]) is not distinguishable from it and
    # doubles this stage, which the 20-minute default cannot afford (bench/results/wm_action_sensitivity_cpu.json)
    r.wm_temperature, r.sigma_init = 0.0, 0.1
    r.grpo.steps, r.grpo.task_instances, r.grpo.rollouts, r.grpo.warmup_steps = 30, 4, 8, 2
    r.grpo.lr, r.grpo.sigma_lr = 1e-5, 1e-4
    r.reward.allow_l1_only_fallback = True  # LPIPS backbone weights are rarely on a fresh laptop
    return r


@dataclass
class QuickstartConfig:
    out_dir: str = "runs/quickstart"
    task: str = "reach"                # a TASKS family or suite (vla_rft_engine.envs.tasks)
    image_size: int = 64
    num_demos: int = 120               # clean expert demos: few, so SFT leaves headroom
    expert_noise: float = 0.0
    wm_demos: int = 120                # world-model and tokenizer data only: wandering episodes (below)
    wm_expert_noise: float = 0.2
    wm_wander_every: int = 4           # > 0: the WM episodes head for a random point re-drawn every k steps, so
                                       # their actions cannot be guessed from the scene (0: noisy expert)
    wm_train_demos: int = 240          # > 0: the world model trains on this many episodes whose goal is re-drawn
                                       # every step, so only the action tokens predict the motion (on the clean
                                       # demos it learns to guess the motion from the scene); 0: on all demos
    data_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one RFT run + one evaluation episode set each
    settings: list[str] = field(default_factory=lambda: ["none", "object_major", "goal_major", "robot_major",
                                                          "all_major"])
    eval_episodes: int = 20            # per (setting, seed)
    gripper_marker: float = 0.0        # > 0: the env draws a bold cyan disc of this radius (world units) on the
                                       # gripper, in every stage (demos, tokenizer, world model, SFT, RFT, evaluation)
    xy_step_scale: float = 1.0         # the env's xy motion per step at |a| = 1, times XY_STEP (every stage too)
    eval_seed: int = 100_000           # TEST episodes: env seed eval_seed + seed. Every default setting was chosen
                                       # on the validation range eval_seed=50_000, never on this one
    progress: bool = True
    device: str = "auto"
    workers: int = 0                   # processes for the RFT seeds and the evaluation; 0: automatic (RFT: on a CPU one
                                       # per seed up to 2x the cores, on a GPU 1; evaluation: the cores, up to 8)
    tokenizer: TokenizerTrainConfig = field(default_factory=_tokenizer)
    world_model: WMTrainConfig = field(default_factory=_world_model)
    sft: SFTConfig = field(default_factory=_sft)
    rft: RFTConfig = field(default_factory=_rft)

    # stage keys the quickstart fills in from its own (top-level) keys: setting them would be silently ignored
    SET_BY_COMMAND: ClassVar[tuple] = (
        "tokenizer.out_dir", "tokenizer.data", "tokenizer.device", "tokenizer.model.image_size",
        "world_model.out_dir", "world_model.demos", "world_model.tokenizer", "world_model.segments",
        "world_model.device", "world_model.progress", "sft.out_dir", "sft.data", "sft.task", "sft.image_size",
        "sft.progress", "sft.device", "rft.out_dir", "rft.seed", "rft.tokenizer", "rft.world_model", "rft.policy",
        "rft.demos", "rft.segments", "rft.action_ranges", "rft.progress", "rft.device")

    def env_options(self) -> dict:
        """The table-top env's options (envs.tabletop.ENV_OPTIONS) every stage's data and evaluation use."""
        return {"gripper_marker": self.gripper_marker, "xy_step_scale": self.xy_step_scale}

    @staticmethod
    def expand_argv(argv: list[str]) -> list[str]:
        """`--smoke` = `--config smoke`; the user's key=value still apply on top."""
        if "--smoke" not in argv:
            return argv
        if any(a == "--config" or a.startswith("--config=") for a in argv):
            raise ConfigError("--smoke is `--config smoke`: give one of them")
        return ["--config", "smoke"] + [a for a in argv if a != "--smoke"]

    def validate(self) -> None:
        from .envs.perturb import check_perturbation
        now, default = flat_dict(to_dict(self)), flat_dict(to_dict(QuickstartConfig()))
        bad = [k for k in self.SET_BY_COMMAND if now.get(k) != default.get(k)]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: set by the quickstart itself from its top-level keys (out_dir, task, "
                              "image_size, seeds, device, progress); use those, or run the stage's own command")
        from .envs.tasks import resolve_task
        try:
            resolve_task(self.task)
            for s in self.settings:
                check_perturbation(None if s == "none" else s)
            from .envs.tabletop import check_env_options
            check_env_options(**self.env_options())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: automatic), got {self.workers}")
        if self.num_demos < 2 or self.wm_demos < 0 or self.wm_train_demos < 0 or self.eval_episodes < 1:
            raise ConfigError("num_demos must be >= 2, wm_demos and wm_train_demos >= 0, eval_episodes >= 1")
