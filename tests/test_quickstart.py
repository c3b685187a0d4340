"""`vla-rft quickstart` reduced to tiny sizes: every stage runs, the artifacts exist, a re-run resumes."""
import json

import pytest

from vla_rft_engine import cli
from vla_rft_engine.config import ConfigError, load_config
from vla_rft_engine.quickstart import STAGES, QuickstartConfig
from vla_rft_engine.rl.rft_config import RFTConfig

TINY = ["num_demos=6", "wm_demos=4", "wm_train_demos=4", "tokenizer.steps=2", "tokenizer.eval_pairs=4", "world_model.steps=2",
        "world_model.batch_size=2", "sft.steps=2", "sft.batch_size=8", "rft.grpo.steps=2", "rft.grpo.task_instances=2",
        "rft.grpo.rollouts=2", "rft.states_per_block=2", "eval_episodes=1", "seeds=[0,1,2]",
        "settings=[none,all_major]", "progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    assert cli.main(["quickstart", "--smoke", f"out_dir={out}", *TINY]) == 0  # the smoke preset, shrunk further
    return out


def test_every_stage_leaves_its_artifacts(run_dir):
    state = json.loads((run_dir / "quickstart_state.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    for f in ("demos.pt", "tokenizer/tokenizer.safetensors", "world_model/world_model/config.json",
              "world_model/world_model/action_ranges.json", "world_model/world_model/world.json",
              "world_model/world_model/tokenizer/tokenizer.safetensors", "wm_eval/metrics.json", "sft/ckpt.pt", "rft/seed0/ckpt.pt",
              "rft/seed2/ckpt.pt",
              "results.json", "results.md", "reward_curve.png", "wm_rollout.png", "action_distributions.png"):
        assert (run_dir / f).is_file(), f
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["table"]) == {"none", "all_major"}
    ci = res["gain_ci95"]  # paired bootstrap over every (setting, seed) episode pair
    assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["episodes"] == 2 * 3 * 1
    assert set(res["rft_signal"]) == {"seed0", "seed1", "seed2"}
    wm = res["world_model_eval"]
    assert wm["moving_l1_ratio"] > 0 and "moving_l1_swapped" in wm
    for row in res["table"].values():  # mean over seeds of the per-seed numbers, delta = rft - sft
        per = row["per_seed"]
        assert set(per) == {"0", "1", "2"}
        assert row["sft"] == pytest.approx(sum(v["sft"] for v in per.values()) / 3)
        assert row["delta"] == pytest.approx(row["rft"] - row["sft"])
    # each RFT seed is evaluated on its own episode set only; SFT on all of them
    pols = {(r["policy"], r["seed"]) for r in res["records"]}
    assert ("rft_seed1", 1) in pols and ("rft_seed1", 0) not in pols and ("sft", 0) in pols
    md = (run_dir / "results.md").read_text()
    assert "| SFT |" in md and "| RFT (R3) |" in md and "Per seed" in md and "paired bootstrap 95% interval" in md
    assert "Reward: R3" in md and "L1 only" in md  # the tests have no LPIPS backbone weights


def test_rerun_resumes_and_redoes_a_missing_stage(run_dir, capsys):
    (run_dir / "results.md").unlink()
    assert cli.main(["quickstart", f"out_dir={run_dir}", *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == len(STAGES) - 1
    assert "report: " in out and (run_dir / "results.md").is_file()


def test_rft_seeds_in_worker_processes_equal_one_process(run_dir, tmp_path):
    """The RFT stage's seeds in two spawned processes give the rewards of one process (to float noise: the thread
    count changes the summation order)."""
    import torch

    from vla_rft_engine.quickstart import Quickstart
    cfg = load_config(QuickstartConfig, "smoke", [f"out_dir={run_dir}", *TINY], command="quickstart")
    rewards = {}
    for w in (1, 2):
        cfg.workers = w
        q = Quickstart(cfg)
        q.paths["rft"] = tmp_path / f"workers{w}"
        assert q.rft_workers() == w
        out = q.stage_rft()
        assert set(out) == {"seed0", "seed1", "seed2"}
        rewards[w] = [[json.loads(line)["reward/mean"] for line in open(q.paths["rft"] / f"seed{s}" / "metrics.jsonl")]
                      for s in cfg.seeds]
    assert all(len(r) == 2 for r in rewards[2])
    torch.testing.assert_close(torch.tensor(rewards[2]), torch.tensor(rewards[1]), rtol=1e-3, atol=1e-5)
    assert rewards[1][0] != rewards[1][1]  # the seeds differ, so a mixed-up order would fail


def test_evaluation_in_worker_processes_equals_one_process(run_dir, tmp_path):
    from vla_rft_engine.evaluation import evaluate_checkpoints
    ckpts = {"sft": run_dir / "sft" / "ckpt.pt", "rft_seed0": run_dir / "rft" / "seed0" / "ckpt.pt"}
    res = {w: evaluate_checkpoints(ckpts, "reach", ["none", "all_major"], [0, 1], 2, 777, 64,
                                   cache=tmp_path / f"eval{w}.json", progress=False, workers=w) for w in (1, 2)}
    assert len(res[1]) == 2 * 2 + 2  # sft on both seeds, rft_seed0 on its own seed only
    assert res[2] == res[1]  # same jobs, same order, same per-episode outcomes


def test_changed_config_is_refused(run_dir, capsys):
    assert cli.main(["quickstart", f"out_dir={run_dir}", *TINY[:-1], "sft.steps=3"]) == 2
    assert "(sft.steps: 2 before vs 3 now)" in capsys.readouterr().err


def test_bad_input_errors(capsys):
    with pytest.raises(ConfigError, match="unknown task 'stack'"):
        load_config(QuickstartConfig, None, ["task=stack"])
    with pytest.raises(ConfigError, match="perturbation"):
        load_config(QuickstartConfig, None, ["settings=[none,object_huge]"])
    assert cli.main(["quickstart", "rft.grpo.stepz=3"]) == 2
    assert "unknown config key 'rft.grpo.stepz'" in capsys.readouterr().err


def test_env_options_reach_every_stage(tmp_path, monkeypatch):
    import vla_rft_engine.data.demos as demos_mod
    import vla_rft_engine.train.sft as sft_mod
    from vla_rft_engine.quickstart import Quickstart
    c = load_config(QuickstartConfig, None, [])
    assert c.env_options() == {"gripper_marker": 0.0, "xy_step_scale": 1.0}  # off by default
    with pytest.raises(ConfigError, match="gripper_marker"):
        load_config(QuickstartConfig, None, ["gripper_marker=-1"])
    c = load_config(QuickstartConfig, None, [f"out_dir={tmp_path}", "num_demos=2", "wm_demos=1", "wm_train_demos=1",
                                             "gripper_marker=0.12", "xy_step_scale=2", "progress=false",
                                             "workers=1"])  # the spies below live in this process
    qs = Quickstart(c)
    qs.stage_demos()  # the demos every stage trains on (tokenizer, world model, SFT, RFT start frames) ...
    for k in ("demos", "demos_all", "demos_wm"):
        d = demos_mod.load_demos(qs.paths[k])
        assert d["gripper_marker"] == 0.12 and d["xy_step_scale"] == 2.0
    seen: dict = {}  # ... and the evaluation's env

    def spy(*a, **kw):
        seen.update(kw)
        raise RuntimeError("stop")
    monkeypatch.setattr(demos_mod, "evaluate_policy", spy)
    monkeypatch.setattr(sft_mod, "load_policy", lambda path: None)
    with pytest.raises(RuntimeError, match="stop"):
        qs.stage_evaluate()
    assert seen["gripper_marker"] == 0.12 and seen["xy_step_scale"] == 2.0


def test_smoke_preset_is_small_and_overridable():
    c = load_config(QuickstartConfig, "smoke", ["sft.steps=7"], command="quickstart")
    assert c.out_dir == "runs/quickstart_smoke" and c.seeds == [0] and c.sft.steps == 7
    assert c.world_model.steps < QuickstartConfig().world_model.steps
    assert QuickstartConfig.expand_argv(["--smoke", "x=1"]) == ["--config", "smoke", "x=1"]
    with pytest.raises(ConfigError, match="--smoke is `--config smoke`"):
        QuickstartConfig.expand_argv(["--smoke", "--config", "paper"])


def test_named_quickstart_presets():
    d = QuickstartConfig()
    v = load_config(QuickstartConfig, "validation", command="quickstart")
    assert v.eval_seed == 50_000 != d.eval_seed  # the choosing range, never the test range
    assert (v.rft.grpo.steps, v.sft.steps, v.seeds) == (d.rft.grpo.steps, d.sft.steps, d.seeds)  # else the default
    r1 = load_config(QuickstartConfig, "r1_control", command="quickstart")
    assert r1.rft.reward.design == "r1" and d.rft.reward.design == "r3"  # the control is never the default
    assert (r1.rft.grpo.lr, r1.rft.grpo.steps, r1.rft.sigma_init) == (1e-5, 60, 0.1)
    with pytest.raises(ConfigError, match="no section for `vla-rft rft`"):
        load_config(RFTConfig, "smoke", command="rft")


def test_stage_keys_the_quickstart_sets_are_refused(capsys):
    assert cli.main(["quickstart", "rft.seed=7", "sft.task=push"]) == 2
    err = capsys.readouterr().err
    assert "sft.task, rft.seed: set by the quickstart itself" in err
    assert cli.main(["quickstart", "--help"]) == 0
    out = capsys.readouterr().out
    assert "rft.seed=0" in out and "[set by quickstart]" in out.split("rft.seed=0", 1)[1].splitlines()[0]
