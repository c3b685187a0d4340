"""LIBERO HDF5 demos: write -> read round trip, and a file laid out as the original LIBERO release (no sim)."""
import json

import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="h5py not installed (pip install '.[libero]')")

from vla_rft_engine.data.demos import load_demos  # noqa: E402
from vla_rft_engine.data.libero_hdf5 import load_libero_hdf5, save_libero_hdf5  # noqa: E402


def _demos(n=3, T=6, s=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"frames": rng.integers(0, 256, (n, T + 1, s, s, 3), dtype=np.uint8),
            "wrist": rng.integers(0, 256, (n, T + 1, s, s, 3), dtype=np.uint8),
            "actions": rng.uniform(-1, 1, (n, T, 7)).astype(np.float32),
            "proprio": rng.normal(size=(n, T + 1, 8)).astype(np.float32),
            "states": rng.normal(size=(n, T + 1, 11)),
            "success": np.array([True, False, True]), "lengths": np.array([4, T, T]),
            "seeds": np.arange(n), "instructions": ["pick up the milk", "pick up the milk", "pick up the soup"]}


def test_round_trip(tmp_path):
    d = _demos()
    path = save_libero_hdf5(d, tmp_path / "milk_demo.hdf5")
    back = load_libero_hdf5(path, wrist=True)
    for k in ("frames", "wrist", "actions", "success", "lengths"):
        np.testing.assert_array_equal(back[k], d[k], err_msg=k)
    np.testing.assert_allclose(back["proprio"], d["proprio"], rtol=1e-6)
    assert back["instructions"] == d["instructions"]
    # the official layout, as LIBERO's readers expect it
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == "pick up the milk"
        assert data.attrs["num_demos"] == 3 and data.attrs["macros_image_convention"] == "opengl"
        g = data["demo_0"]
        assert g.attrs["num_samples"] == 7 and g["actions"].shape == (7, 7) and g["states"].shape == (7, 11)
        assert set(g["obs"]) >= {"agentview_rgb", "eye_in_hand_rgb", "ee_states", "ee_pos", "ee_ori", "gripper_states"}
        assert g["robot_states"].shape == (7, 9) and list(g["rewards"][()]) == [0, 0, 0, 0, 1, 1, 1]
        np.testing.assert_array_equal(g["obs/agentview_rgb"][0], d["frames"][0, 0][::-1, ::-1])  # OpenGL on disk
    # load_demos (sft, pretrain-wm, wm-eval) takes the file or its folder
    np.testing.assert_array_equal(load_demos(path)["actions"], d["actions"])
    assert load_demos(tmp_path)["frames"].shape == d["frames"].shape


def test_original_release_layout(tmp_path):
    """Variable lengths, observations recorded after their action, success only at the last sample."""
    rng = np.random.default_rng(1)
    path = tmp_path / "task_demo.hdf5"
    lens = [5, 8]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_kitchen_tabletop_manipulation",
                                                 "domain_name": "robosuite", "language_instruction": "open the drawer"})
        data.attrs["env_args"] = json.dumps({"type": 1})
        data.attrs["macros_image_convention"] = "opengl"
        for i, n in enumerate(lens):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=rng.uniform(-1, 1, (n, 7)))
            g.create_dataset("rewards", data=np.eye(n, dtype=np.uint8)[-1])
            g.create_dataset("states", data=rng.normal(size=(n, 9)))
            o = g.create_group("obs")
            o.create_dataset("agentview_rgb", data=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
            o.create_dataset("ee_states", data=rng.normal(size=(n, 6)))
            o.create_dataset("gripper_states", data=rng.normal(size=(n, 2)))
            g.attrs["num_samples"] = n
    with h5py.File(path, "r") as f:
        acts1 = f["data/demo_1/actions"][()]
        img0 = f["data/demo_0/obs/agentview_rgb"][()]
    d = load_libero_hdf5(path, obs_after_action=True)
    assert d["frames"].shape == (2, 8, 8, 8, 3) and d["actions"].shape == (2, 7, 7)
    np.testing.assert_allclose(d["actions"][1], acts1[1:])  # obs k follows action k: action 0 has no frame before it
    assert list(d["lengths"]) == [4, 7] and d["success"].all()
    np.testing.assert_array_equal(d["frames"][0, 4], img0[4][::-1, ::-1])
    np.testing.assert_array_equal(d["frames"][0, 5:], np.repeat(d["frames"][0, 4:5], 3, 0))  # padded: last frame held
    assert (d["actions"][0, 4:, :6] == 0).all() and d["instructions"] == ["open the drawer"] * 2


def test_not_a_libero_file(tmp_path):
    from vla_rft_engine.config import BadFileError
    p = tmp_path / "x.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("y", data=np.zeros(3))
    with pytest.raises(BadFileError, match="no 'data' group"):
        load_demos(p)


def test_a_folder_of_demos_has_a_content_hash(tmp_path):
    """pretrain-wm records the hash of its demos, which may be a folder of .hdf5 files (a LIBERO suite)."""
    from vla_rft_engine.utils import file_sha256
    d = tmp_path / "suite"
    save_libero_hdf5(_demos(), d / "a_demo.hdf5")
    save_libero_hdf5(_demos(seed=1), d / "b_demo.hdf5")
    h = file_sha256(d)
    assert h == file_sha256(d) and len(h) == 16
    save_libero_hdf5(_demos(seed=2), d / "b_demo.hdf5")
    assert file_sha256(d) != h
