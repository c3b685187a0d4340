"""Presets shipped in vla_rft_engine/configs/: `--config paper` (Tables 5-7 as written) and `--config release`
(the authors' LIBERO run script and trainer defaults), loaded by name; paths still work; unknown names and
missing sections are one-line errors. Expected numbers are typed in from the paper's tables here."""
from __future__ import annotations

import shutil
from importlib import resources

import pytest

from vla_rft_engine import cli
from vla_rft_engine.config import PRESETS_DIR, ConfigError, load_config, preset_names
from vla_rft_engine.rl.rft_config import RFTConfig
from vla_rft_engine.train.sft import SFTConfig
from vla_rft_engine.train.world_model_config import WMTrainConfig


def test_presets_ship_inside_the_package():
    assert preset_names() == ["paper", "r1_control", "release", "smoke", "validation"]
    pkg = resources.files("vla_rft_engine") / "configs"
    assert all((pkg / f"{n}.yaml").is_file() for n in preset_names())  # setup.py package_data: configs/*.yaml


def test_paper_rft_is_table7():
    c = load_config(RFTConfig, "paper", command="rft")
    g = c.grpo
    # Table 7: lr 1e-6, sigma lr 1e-5, MSE coef 0.01, entropy coef 0.003, 400 steps, batch 16, 16 rollouts
    assert (g.lr, g.sigma_lr, g.mse_coef, g.entropy_coef) == (1e-6, 1e-5, 0.01, 0.003)
    assert (g.steps, g.task_instances, g.rollouts) == (400, 16, 16)
    # the equations' forms: Eq. 8 mean, Eq. 9 per rollout, Eq. 12 without std, Eq. 13 clip, no gate / dual clip
    assert (g.logprob_reduce, g.ratio_level, g.policy_loss) == ("mean", "rollout", "clip")
    assert not g.normalize_adv_std and not g.mse_kl_gate and not g.clip_ratio_c
    assert (c.reward.design, c.reward.aggregation, c.reward.pixel_loss) == ("r3", "sum", "l1")  # Table 4, Eq. 11


def test_paper_sft_and_world_model_are_tables_5_and_6():
    s = load_config(SFTConfig, "paper", command="sft")
    assert (s.lr, s.batch_size, s.steps, s.policy.lora_rank) == (1e-4, 16, 150_000, 64)  # Table 6
    assert (s.policy.action_dim, s.policy.num_steps) == (7, 10)  # LIBERO 7-D; Eq. 5-7 delta = 0.1
    w = load_config(WMTrainConfig, "paper", ["segments=seg.pt"], command="pretrain-wm")
    assert (w.lr, w.batch_size, w.steps, w.segment_frames - 1) == (5e-5, 16, 150_000, 8)  # Table 5
    from vla_rft_engine.models.world_model import WorldModelConfig
    m = WorldModelConfig.preset(w.preset)  # Table 5 architecture
    assert (m.n_layer, m.dim, m.intermediate_size, m.n_head, m.head_dim, m.n_kv_head, m.max_position, m.vocab_size) \
        == (12, 768, 3072, 12, 64, 12, 8192, 9008)


def test_release_rft():
    c = load_config(RFTConfig, "release", command="rft")
    g, r = c.grpo, c.reward
    # run script: lr 1e-6, sigma_lr 1e-5, warm-up 10, MSE 0.01 gated over KL in [0, 0.2], entropy 0.003, 16 x 16
    assert (g.lr, g.sigma_lr, g.warmup_steps, g.mse_coef, g.entropy_coef) == (1e-6, 1e-5, 10, 0.01, 0.003)
    assert g.mse_kl_gate and (g.mse_kl_low, g.mse_kl_high, g.mse_kl_estimator) == (0.0, 0.2, "k1")
    assert (g.task_instances, g.rollouts, g.minibatches, g.ppo_epochs, g.steps) == (16, 16, 1, 1, 400)
    # trainer: PPO min form, clip 0.2, dual clip 3, std-normalised advantages, grad clip 1, per-element sums
    assert (g.policy_loss, g.clip_eps, g.clip_ratio_c, g.normalize_adv_std, g.adv_eps) == ("ppo", 0.2, 3.0, True, 1e-6)
    assert (g.grad_clip, g.logprob_reduce, g.ratio_level, g.warmup_sigma) == (1.0, "sum", "element", False)
    assert (g.weight_decay, g.sigma_weight_decay, c.sigma_min, c.sigma_max) == (0.01, 0.01, 0.08, 0.2)
    assert c.sigma_init == pytest.approx((0.08 * 0.2) ** 0.5, abs=1e-4)
    assert (c.wm_temperature, c.wm_top_p, c.wm_top_k) == (1.0, 0.8, 0)
    assert (r.lambda_1, r.lambda_lp, r.pixel_loss, r.lpips_net, r.aggregation, r.gamma) == (1.0, 1.0, "l1", "vgg", "mean", 0.95)


def test_overrides_win_and_a_path_still_works(tmp_path):
    c = load_config(RFTConfig, "release", ["grpo.steps=7", "reward.lpips_net=alex"], command="rft")
    assert c.grpo.steps == 7 and c.reward.lpips_net == "alex" and c.grpo.ratio_level == "element"
    mine = tmp_path / "mine.yaml"
    shutil.copy(PRESETS_DIR / "paper.yaml", mine)
    assert load_config(RFTConfig, str(mine), command="rft") == load_config(RFTConfig, "paper", command="rft")
    flat = tmp_path / "flat.yaml"
    flat.write_text("grpo:\n  lr: 2.0e-6\nseed: 3\n")  # a flat, one-command file
    c = load_config(RFTConfig, flat, command="rft")
    assert c.grpo.lr == 2e-6 and c.seed == 3


def test_unknown_names_and_missing_sections_are_one_line_errors(tmp_path, capsys):
    names = r"\(paper, r1_control, release, smoke, validation\)"
    with pytest.raises(ConfigError, match=r"'papr' is neither a file nor a shipped preset " + names):
        load_config(RFTConfig, "papr", command="rft")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RFTConfig, str(tmp_path / "nope.yaml"), command="rft")
    with pytest.raises(ConfigError, match="no section for `vla-rft sft`; its sections: rft"):
        load_config(SFTConfig, "release", command="sft")
    with pytest.raises(ConfigError, match="one section per command"):
        load_config(RFTConfig, "paper")
    assert cli.main(["rft", "--config", "relase"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "r1_control, release" in err and "relase" in err


def test_help_shows_the_preset(capsys):
    assert cli.main(["rft", "--config", "release", "--help"]) == 0
    out = capsys.readouterr().out
    assert "grpo.ratio_level=element" in out and "grpo.clip_ratio_c=3.0" in out
    assert cli.main(["--help"]) == 0
    assert "paper, r1_control, release, smoke, validation" in capsys.readouterr().out
