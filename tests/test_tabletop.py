"""The built-in table-top suite: determinism, rendering, physics, expert, perturbations, demos."""
import numpy as np
import pytest

from vla_rft_engine.data.demos import collect_demos, evaluate_policy, load_demos, save_demos
from vla_rft_engine.envs import (PERTURBATION_MAGNITUDES, PERTURBATIONS, PROPRIO_DIM, SUITES, TASKS, TableTopEnv,
                                 expert_action, random_episodes, render_strip)
from vla_rft_engine.envs import tabletop as tt


def _run(env, actions):
    return [env.step(a)[0] for a in actions]


def _pix(xy, size=64):
    """World xy -> (row, col) of the pixel containing it."""
    return int((1 - xy[1]) / 2 * size), int((xy[0] + 1) / 2 * size)


def _lone_object_env(**kw):
    """A push env with object 0 alone in the middle of the table and the gripper high above the home pose."""
    env = TableTopEnv("push", seed=0, **kw)
    env.reset(seed=3)
    env.obj_pos[:] = [[0.0, 0.0], [0.8, 0.8], [-0.8, 0.8]]
    env.target_pos[:] = [[0.8, -0.8], [-0.8, -0.8]]
    env.grip[:] = [0.0, -0.48, 0.3]  # 8 steps of +y reach the object
    return env


def test_determinism_and_obs_layout():
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, (20, 7))
    a, b = TableTopEnv("tabletop", seed=5), TableTopEnv("tabletop", seed=5)
    oa, ob = a.reset(seed=11), b.reset(seed=11)
    assert oa["instruction"] == ob["instruction"] and np.array_equal(oa["image"], ob["image"])
    for x, y in zip(_run(a, acts), _run(b, acts)):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["proprio"], y["proprio"])
    assert not np.array_equal(a.reset(seed=12)["image"], b.reset(seed=13)["image"])
    # unseeded resets follow the constructor seed
    assert TableTopEnv(seed=1).reset()["instruction"] == TableTopEnv(seed=1).reset()["instruction"]
    obs = a.reset(seed=0)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (64, 64, 3)
    p = obs["proprio"]
    assert p.dtype == np.float32 and p.shape == (PROPRIO_DIM,)
    np.testing.assert_allclose(p[:3], a.grip, atol=1e-6)
    np.testing.assert_allclose(p[3:8], [0.0, 1.0, 1.0, 0.0, -1.0])  # sin, cos yaw, open, not held, cmd open
    assert TableTopEnv(image_size=96).reset()["image"].shape == (96, 96, 3)


def test_moving_gripper_and_object_changes_the_right_pixels():
    env = _lone_object_env()
    before = env.render()
    env.step([1, 0, 0, 0, 0, 0, -1])  # gripper moves right by XY_STEP
    diff = np.abs(env.render().astype(int) - before).sum(-1) > 8
    rows, cols = np.nonzero(diff)
    gr, gc = _pix(env.grip)
    assert diff.any() and abs(rows.mean() - gr) < 6 and abs(cols.mean() - gc) < 6
    assert not diff[:, :20].any() and not diff[:20].any()  # nothing far from the gripper changed
    before = env.render()
    env.obj_pos[0] = [0.4, 0.4]
    diff = np.abs(env.render().astype(int) - before).sum(-1) > 8
    for xy in ([0.0, 0.0], [0.4, 0.4]):
        r, c = _pix(xy)
        assert diff[r, c]
    assert not diff[52:].any()  # the gripper's area (y < -0.6) is untouched


def test_gripper_marker_is_off_by_default_and_draws_a_bold_disc_on_the_gripper():
    plain, default = _lone_object_env(), _lone_object_env(gripper_marker=0.0)
    assert plain.gripper_marker == 0.0 and plain.xy_step == tt.XY_STEP
    assert np.array_equal(plain.render(), default.render())  # off by default: the old frames, pixel for pixel
    env = _lone_object_env(gripper_marker=0.12)
    img, ref = env.render().astype(int), plain.render().astype(int)
    diff = np.abs(img - ref).sum(-1) > 8
    rows, cols = np.nonzero(diff)
    gr, gc = _pix(env.grip)
    r_px = 0.12 * (1 + 0.8 * env.grip[2]) * 32  # radius in pixels at the gripper's height
    assert diff.sum() > 2.5 * r_px ** 2  # a filled disc (pi r^2 minus the fingers drawn over it), not a few lines
    assert np.hypot(rows - gr, cols - gc).max() <= r_px + 1.5  # and nothing outside it changed
    # saturated cyan inside, a colour no object, target or the table has; the fingers are drawn on top
    r_in, c_in = int(gr - 0.5 * r_px), gc  # above the bar, between the fingers
    assert img[r_in, c_in, 0] < 40 and img[r_in, c_in, 1] > 200 and img[r_in, c_in, 2] > 200
    # the marker follows the gripper: one step changes the frame about twice as much, and three times as many
    # pixels change strongly (by over 150 of 765 summed over RGB: whole colours, not anti-aliased edges)
    change, strong = [], []
    for e in (plain, env):
        before = e.render().astype(int)
        e.step([1, 0, 0, 0, 0, 0, -1])
        d = np.abs(e.render().astype(int) - before).sum(-1)
        change.append(int(d.sum()))
        strong.append(int((d > 150).sum()))
    assert change[1] > 1.8 * change[0] and strong[1] > 3 * strong[0]
    # one episode's frames differ only where the gripper is; the physics is the same
    assert np.allclose(env.grip, plain.grip) and np.allclose(env.obj_pos, plain.obj_pos)


def test_xy_step_scale_and_env_option_errors():
    env = _lone_object_env(xy_step_scale=2.0)
    x0 = env.grip[0]
    env.step([0.5, 0, 0, 0, 0, 0, -1])
    assert env.grip[0] - x0 == pytest.approx(0.5 * 2 * tt.XY_STEP)
    d = collect_demos("reach", 3, seed=0, image_size=32, max_steps=30, xy_step_scale=2.0, gripper_marker=0.12)
    assert d["success"].all() and d["gripper_marker"] == 0.12 and d["xy_step_scale"] == 2.0
    # the expert follows the env's step: about half as many steps as at the default step
    assert d["lengths"].mean() < 0.75 * collect_demos("reach", 3, seed=0, image_size=32, max_steps=30)["lengths"].mean()
    for kw, msg in (({"gripper_marker": -0.1}, "gripper_marker"), ({"gripper_marker": np.nan}, "gripper_marker"),
                    ({"xy_step_scale": 0.0}, "xy_step_scale")):
        with pytest.raises(ValueError, match=msg):
            TableTopEnv("reach", **kw)


def test_grasp_lift_release_and_straddle():
    env = _lone_object_env()
    for _ in range(8):  # above the object
        env.step([0, 1, 0, 0, 0, 0, -1])
    assert np.allclose(env.obj_pos[0], 0.0)  # travelling high does not push
    for _ in range(6):  # descend with open fingers straddling it: no push
        env.step([0, 0, -1, 0, 0, 0, -1])
    assert env.grip[2] < tt.GRASP_Z and np.allclose(env.obj_pos[0], 0.0) and env.held == -1
    for _ in range(2):
        env.step([0, 0, 0, 0, 0, 0, 1])
    assert env.held == 0 and env.proprio()[6] == 1.0
    for _ in range(6):
        env.step([0.5, 0, 1, 0, 0, 0, 1])
    assert env.obj_z[0] == pytest.approx(env.grip[2]) and np.allclose(env.obj_pos[0], env.grip[:2])
    env.step([0, 0, 0, 0, 0, 0, -1])
    assert env.held == -1 and env.obj_z[0] == 0.0 and np.allclose(env.obj_pos[0], env.grip[:2])
    # closing high above an object grasps nothing
    env2 = _lone_object_env()
    env2.grip[:] = [0.0, 0.0, 0.3]
    _run(env2, [[0, 0, 0, 0, 0, 0, 1]] * 3)
    assert env2.held == -1 and env2.opening == 0.0


def test_push_moves_object_along_gripper_motion():
    env = _lone_object_env()
    env.grip[:] = [0.0, -0.3, 0.03]
    _run(env, [[0, 1, 0, 0, 0, 0, -1]] * 8)  # low, moving up (+y) into the object
    assert env.obj_pos[0, 1] > 0.1 and abs(env.obj_pos[0, 0]) < 0.02
    assert np.linalg.norm(env.obj_pos[0] - env.grip[:2]) >= tt.OBJ_R + tt.GRIP_R - 1e-6
    # objects push each other and stay on the table
    env.obj_pos[1] = env.obj_pos[0] + [0.0, 0.1]
    _run(env, [[0, 1, 0, 0, 0, 0, -1]] * 30)
    assert np.linalg.norm(env.obj_pos[0] - env.obj_pos[1]) >= 2 * tt.OBJ_R - 1e-3
    assert np.abs(env.obj_pos).max() <= tt.OBJ_BOUND


def test_actions_clipped_and_validated():
    a, b = _lone_object_env(), _lone_object_env()
    oa = a.step([5, -7, 3, 9, 9, 4, 2])[0]
    ob = b.step([1, -1, 1, 0, 0, 1, 1])[0]  # roll/pitch ignored, rest clipped
    assert np.array_equal(oa["image"], ob["image"]) and np.array_equal(oa["proprio"], ob["proprio"])
    with pytest.raises(ValueError, match="NaN"):
        a.step([0, np.nan, 0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="7 values"):
        a.step([0, 0, 0])


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="pick_place"):
        TableTopEnv(task="stack")
    with pytest.raises(ValueError, match="object_major"):
        TableTopEnv(perturbation="lighting")
    assert set(SUITES["tabletop"]) <= set(TASKS) and {"push", "pick_place"} <= set(TASKS)


@pytest.mark.parametrize("family", sorted(TASKS))
def test_expert_solves_each_family(family):
    env = TableTopEnv(family, seed=0)
    wins = 0
    for s in range(12):
        env.reset(seed=s)
        assert not env._success
        done = False
        while not done:
            _, _, done, info = env.step(expert_action(env))
        wins += info["success"]
    assert wins / 12 >= 0.9


def test_noisy_expert_still_works():
    env = TableTopEnv("pick_place", seed=0, perturbation="all_major")
    rng, wins = np.random.default_rng(0), 0
    for s in range(6):
        env.reset(seed=s)
        done = False
        while not done:
            _, _, done, info = env.step(expert_action(env, noise=0.2, rng=rng))
        wins += info["success"]
    assert wins >= 5


def test_perturbations_shift_by_documented_magnitude():
    assert PERTURBATIONS[0] == "none" and len(PERTURBATIONS) == 9
    base = TableTopEnv("push", seed=0)
    for name in PERTURBATIONS[1:]:
        obj_mag, goal_mag, robot_xy, robot_z = PERTURBATION_MAGNITUDES[name]
        env = TableTopEnv("push", seed=0, perturbation=name)
        for s in range(5):
            base.reset(seed=s)
            env.reset(seed=s)
            assert env.instruction == base.instruction and not env._success
            np.testing.assert_allclose(np.linalg.norm(env.obj_pos - base.obj_pos, axis=1), obj_mag, atol=1e-9)
            np.testing.assert_allclose(np.linalg.norm(env.target_pos - base.target_pos, axis=1), goal_mag, atol=1e-9)
            assert np.linalg.norm(env.grip[:2] - base.grip[:2]) == pytest.approx(robot_xy)
            assert abs(env.grip[2] - base.grip[2]) == pytest.approx(robot_z)
    for fam in ("object", "goal", "robot", "all"):
        minor, major = PERTURBATION_MAGNITUDES[f"{fam}_minor"], PERTURBATION_MAGNITUDES[f"{fam}_major"]
        assert max(major) > max(minor) and all(M >= m for m, M in zip(minor, major))


def test_random_episodes_shapes_determinism_and_motion():
    f, a, stats = random_episodes(6, 24, seed=3, image_size=32, return_stats=True)
    assert f.shape == (6, 25, 32, 32, 3) and f.dtype == np.uint8
    assert a.shape == (6, 24, 7) and a.dtype == np.float32 and np.abs(a).max() <= 1.0
    f2, a2 = random_episodes(6, 24, seed=3, image_size=32)
    assert np.array_equal(f, f2) and np.array_equal(a, a2)
    assert (stats["moved"] > 0.05).any()  # random play does touch objects
    assert np.abs(np.diff(a[..., :3], axis=1)).mean() < np.abs(a[..., :3]).mean()  # smooth, not white noise


def test_render_strip():
    f, _ = random_episodes(2, 4, seed=0, image_size=16)
    img = render_strip(f, scale=2, pad=2)
    assert img.size == ((5 * 18 + 2) * 2, (2 * 18 + 2) * 2)
    assert render_strip(f[0]).size[1] == (16 + 4) * 2


def test_demos_round_trip_padding_and_errors(tmp_path):
    d = collect_demos("reach", 3, seed=0, image_size=32, max_steps=30)
    assert d["frames"].shape == (3, 31, 32, 32, 3) and d["actions"].shape == (3, 30, 7)
    assert d["proprio"].shape == (3, 31, PROPRIO_DIM) and len(d["instructions"]) == 3
    assert d["success"].all()
    for i, n in enumerate(d["lengths"]):  # after success: zero motion, gripper command held
        assert np.all(d["actions"][i, n:, :6] == 0) and np.all(d["actions"][i, n:, 6] == d["proprio"][i, n, 7])
    path = tmp_path / "demos.pt"
    save_demos(d, path)
    e = load_demos(path)
    for k in ("frames", "actions", "proprio", "success", "lengths"):
        assert np.array_equal(e[k], d[k])
    assert e["instructions"] == d["instructions"] and e["task"] == "reach"
    with pytest.raises(FileNotFoundError):
        load_demos(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RuntimeError, match="corrupt"):
        load_demos(bad)
    import torch
    blob = torch.load(path, weights_only=False)
    blob["version"] = 99
    torch.save(blob, bad)
    with pytest.raises(RuntimeError, match="version"):
        load_demos(bad)


def test_evaluate_policy_replays_demos_in_chunks():
    d = collect_demos("pick_place", 3, seed=4, image_size=32)
    state = {"ep": -1, "t": 0}

    def replay(obs, chunk=8):
        nxt = state["ep"] + 1
        if nxt < 3 and np.array_equal(obs["image"], d["frames"][nxt, 0]):  # a new episode began
            state.update(ep=nxt, t=0)
        t = state["t"]
        state["t"] += chunk
        return d["actions"][state["ep"], t:t + chunk]

    res = evaluate_policy(replay, "pick_place", num_episodes=3, seed=4, image_size=32)
    assert res["success_rate"] == d["success"].mean() == 1.0
    assert [e["steps"] for e in res["episodes"]] == list(d["lengths"])
    assert evaluate_policy(lambda o: np.zeros(7), "reach", num_episodes=2, image_size=32)["success_rate"] == 0.0
    with pytest.raises(ValueError, match="chunk"):
        evaluate_policy(lambda o: np.zeros((2, 6)), "reach", num_episodes=1, image_size=32)
