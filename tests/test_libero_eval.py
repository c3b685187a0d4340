"""`vla-rft eval`: config and policy errors (one line, exit 2; no LIBERO needed), and one short eval of a tiny
freshly built policy in LIBERO writing results.json / results.md / episodes.png (skipped, with the reason,
where LIBERO cannot render)."""
import json

import numpy as np
import pytest
import torch

from vla_rft_engine.cli import main


def _policy(tmp_path, image_size=32, action_dim=7, proprio_dim=8, name="pol"):
    from vla_rft_engine.models.policy import VLAPolicy
    from vla_rft_engine.models.policy_config import PolicyConfig
    from vla_rft_engine.train.sft import POLICY_WEIGHTS, save_policy_weights
    torch.manual_seed(0)
    pol = VLAPolicy(PolicyConfig(action_dim=action_dim, proprio_dim=proprio_dim, chunk_len=4, z_dim=16, enc_channels=8,
                                 d_model=16, depth=1, heads=2, sigma_d_model=16, sigma_depth=1, num_steps=2))
    pol.set_norm_stats(torch.rand(64, action_dim) * 2 - 1, torch.randn(64, proprio_dim))
    pol.image_size = image_size
    save_policy_weights(pol, tmp_path / name / POLICY_WEIGHTS, step=0)
    return tmp_path / name


def _err(capsys, *argv):
    rc = main(["eval", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_config_errors(capsys, tmp_path):
    assert "needs policy=" in _err(capsys)
    assert "unknown LIBERO suite 'libero_nine'" in _err(capsys, "policy=x", "suite=libero_nine")
    assert "unknown setting(s) ['object_huge']" in _err(capsys, "policy=x", "settings=[none,object_huge]")
    assert "inits must be in 1..50" in _err(capsys, "policy=x", "inits=51")
    assert "policy not found at" in _err(capsys, f"policy={tmp_path / 'nope'}")


def test_policy_mismatch_errors(capsys, tmp_path):
    pol = _policy(tmp_path, image_size=32)
    # trained on 32 px frames, asked for 64: refused before any env is built
    assert "trained on 32px frames, image_size=64 asked" in _err(capsys, f"policy={pol}", "image_size=64")
    wrong = _policy(tmp_path, action_dim=2, name="two_d")
    assert "outputs 2-D actions; LIBERO needs 8-D proprio and 7-D actions" in _err(capsys, f"policy={wrong}")
    # the size round-trips through the weights' header
    from vla_rft_engine.train.sft import load_policy
    assert load_policy(pol).image_size == 32


def _libero_ok():
    from vla_rft_engine.envs.libero_env import libero_status
    return libero_status()


def test_short_eval_writes_json_md_png(capsys, tmp_path):
    ok, why = _libero_ok()
    if not ok:
        pytest.skip(f"LIBERO cannot run here: {why}")
    pol = _policy(tmp_path, image_size=32)
    err = _err(capsys, f"policy={pol}", "tasks=[0,no_such_task]")
    assert "tasks: unknown task 'no_such_task' in libero_object; valid: indices 0..9" in err
    out = tmp_path / "eval"
    rc = main(["eval", f"policy={pol}", "suite=libero_object", "tasks=[0]", "settings=[none,object_major]", "inits=1",
               "workers=1", "max_steps=8", "strip_frames=4", "progress=false", f"out_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["image_size"] == 32 and res["task_indices"] == [0] and res["max_steps"] == 8
    assert res["task_names"] == ["pick_up_the_alphabet_soup_and_place_it_in_the_basket"]
    assert set(res["table"]) == {"none", "object_major"}
    assert all(v["episodes"] == 1 and v["success"] == 0.0 for v in res["table"].values())  # 8 steps: no time to solve
    assert [r["steps"] for r in res["records"]] == [8, 8] and all(r["queries"] == 2 for r in res["records"])
    md = (out / "results.md").read_text()
    assert "| Policy | Spatial | Object | Goal | Long |" in md and "| pol | – | 0.0 | – | – |" in md
    assert "| Policy | Object minor | Object major | Avg |" in md and "| pol | – | 0.0 | 0.0 |" in md
    from PIL import Image
    img = np.asarray(Image.open(out / "episodes.png"))
    assert img.shape[0] > 2 * 64 and img.shape[1] > 4 * 64 and img.std() > 5  # two rows of 4 rendered frames
