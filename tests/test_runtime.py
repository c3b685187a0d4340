"""The torch-free policy runtime (export/runtime.py) and its PyTorch fallback (export/torch_runtime.py): equal to
DeployedPolicy, torch never imported on the onnxruntime path, TensorRT where a GPU is."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vla_rft_engine.export.onnx_export import DeployedPolicy, export_onnx
from vla_rft_engine.export.runtime import (TRT_NEEDS, OnnxRuntimePolicy, backend_available, hash_tokens_np,
                                           load_runtime)
from vla_rft_engine.models.encoders import hash_tokens
from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install '.[onnx]')")

IMG = 32


def tiny_policy() -> VLAPolicy:
    torch.manual_seed(0)
    pol = VLAPolicy(PolicyConfig(d_model=32, depth=1, heads=2, z_dim=32, enc_channels=8, sigma_d_model=16,
                                 sigma_depth=1, chunk_len=4)).eval()
    pol.set_norm_stats(torch.randn(50, 7) * 0.3, torch.randn(50, 8))
    return pol


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pol = tiny_policy()
    return pol, export_onnx(pol, tmp_path_factory.mktemp("rt") / "policy.onnx", image_size=IMG)


def reference(pol, image, ids, proprio, noise):
    with torch.no_grad():
        return DeployedPolicy(pol)(*(torch.as_tensor(x) for x in (image, ids, proprio, noise))).numpy()


def test_hash_tokens_numpy_twin_equals_torch():
    texts = ["Pick up the RED block!", "", "put the blue block on the green zone", "a  b\tc-d 42x", "ünïcode wörds",
             "one"]
    for buckets in (7, 1024, 2 ** 31 - 1):
        np.testing.assert_array_equal(hash_tokens_np(texts, buckets), hash_tokens(texts, buckets).numpy())
    assert hash_tokens_np(["x"], 10).dtype == np.int64


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_runtime_matches_deployed_policy(exported, batch):
    pol, path = exported
    rt = load_runtime(path)
    assert isinstance(rt, OnnxRuntimePolicy) and rt.meta.image_size == (IMG, IMG) and rt.meta.chunk_len == 4
    assert rt.meta.model_id.startswith("policy.onnx@")
    image, ids, proprio, noise = rt.example(batch, "put the blue block on the green zone", seed=batch)
    out = rt(image, ids, proprio, noise)
    assert out.shape == (batch, 4, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(pol, image, ids, proprio, noise), atol=1e-4, rtol=0)


def test_runtime_text_seed_and_slicing(exported):
    """Text goes through the numpy hash, a seed fixes the noise, batches above max_batch run in slices."""
    pol, path = exported
    rt = load_runtime(path, "onnxruntime")
    image, _, proprio, _ = rt.example(5, seed=1)
    words = ["reach the red zone", "push the yellow block", "a", "b c d", "pick"]
    noise = np.random.default_rng(7).standard_normal((5, 4, 7), dtype=np.float32)
    ref = reference(pol, image, hash_tokens(words, 1024).numpy(), proprio, noise)
    np.testing.assert_allclose(rt(image, words, proprio, seed=7), ref, atol=1e-4, rtol=0)
    rt.meta.max_batch = 2
    np.testing.assert_allclose(rt(image, words, proprio, noise), ref, atol=1e-4, rtol=0)


def test_runtime_rejects_wrong_inputs(exported):
    rt = load_runtime(exported[1])
    image, ids, proprio, noise = rt.example(2)
    with pytest.raises(ValueError, match="image must be uint8"):
        rt(image.astype(np.float32), ids, proprio, noise)
    with pytest.raises(ValueError, match="image must be uint8"):
        rt(image[:, :16], ids, proprio, noise)
    with pytest.raises(ValueError, match="proprio must be"):
        rt(image, ids, proprio[:, :3], noise)
    with pytest.raises(ValueError, match="noise must be"):
        rt(image, ids, proprio, noise[:1])
    with pytest.raises(ValueError, match="instruction ids"):
        rt(image, np.zeros((2, 65), np.int64), proprio, noise)


def test_onnx_without_metadata_is_refused(exported, tmp_path):
    import onnx
    m = onnx.load(str(exported[1]))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "old.onnx"))
    with pytest.raises(ValueError, match="re-export"):
        load_runtime(tmp_path / "old.onnx")


def test_runtime_imports_and_runs_without_torch(exported, tmp_path):
    """A robot without torch: `import torch` fails in the child, which loads and runs the ONNX policy."""
    pol, path = exported
    rt = load_runtime(path)
    ex = rt.example(2, seed=3)
    np.save(tmp_path / "ref.npy", reference(pol, *ex))
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from vla_rft_engine.export import runtime, protocol, serve, client  # noqa: F401
rt = runtime.load_runtime({str(path)!r})
out = rt(*rt.example(2, seed=3))
assert np.abs(out - np.load({str(tmp_path / 'ref.npy')!r})).max() <= 1e-4
assert sys.modules["torch"] is None  # still the blocking entry: nothing imported torch for real
print("OK", sorted(m for m in sys.modules if m.startswith("torch.")))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "OK []", p.stdout


def test_tensorrt_unavailable_says_why(exported, tmp_path):
    ok, why = backend_available("tensorrt")
    if ok:
        pytest.skip("TensorRT is usable here (the GPU test below covers it)")
    assert TRT_NEEDS in why
    eng = tmp_path / "policy.engine"
    eng.write_bytes(b"")
    with pytest.raises(RuntimeError, match="backend=tensorrt: needs a CUDA device"):
        load_runtime(eng)


@pytest.mark.skipif(not backend_available("tensorrt")[0] or not torch.cuda.is_available(), reason=TRT_NEEDS)
def test_tensorrt_runtime_matches_pytorch(exported, tmp_path):
    from vla_rft_engine.export.tensorrt_build import build_tensorrt
    pol, path = exported
    for fp16, tol in ((False, 1e-3), (True, 2e-2)):
        eng = build_tensorrt(path, tmp_path / f"p{int(fp16)}.engine", fp16=fp16, max_batch=8)
        assert json.loads(eng.with_suffix(".json").read_text())["meta"]["chunk_len"] == 4
        rt = load_runtime(eng)
        assert rt.meta.backend == "tensorrt" and rt.meta.max_batch == 8
        for b in (1, 5, 11):  # 11 > max_batch: two slices through the same buffers
            ex = rt.example(b, seed=b)
            np.testing.assert_allclose(rt(*ex), reference(pol, *ex), atol=tol, rtol=0)


def test_torch_runtime_eager_equals_deployed(exported, tmp_path):
    from vla_rft_engine.train.sft import save_policy_weights
    pol, _ = exported
    save_policy_weights(pol, tmp_path / "policy.safetensors", step=0)
    for model in (tmp_path / "policy.safetensors", tmp_path):  # the file, or its run dir
        rt = load_runtime(model, "torch", image_size=IMG)
        assert rt.meta.backend == "torch" and rt.meta.model_id.startswith("policy.safetensors@")
        ex = rt.example(3, seed=5)
        np.testing.assert_allclose(rt(*ex), reference(pol, *ex), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="runs a policy checkpoint"):
        load_runtime(exported[1], "torch")


def test_torch_compiled_equals_eager(exported):
    """torch.compile (inductor; on CUDA with CUDA graphs) == eager. One shape bucket: batch 3 pads to 4 rows and
    the ids to 32 words, which must not change the real rows. A cold inductor cache compiles for ~10-50 s on a
    2-core CPU (C++ builds), a warm one in ~6 s."""
    from vla_rft_engine.export.torch_runtime import TorchPolicyRuntime
    if os.environ.get("VLA_RFT_SKIP_COMPILE"):
        pytest.skip("VLA_RFT_SKIP_COMPILE is set: torch.compile's C++ builds are too slow on this machine")
    pol, _ = exported
    eager = TorchPolicyRuntime(pol, image_size=IMG)
    comp = TorchPolicyRuntime(pol, image_size=IMG, compiled=True, max_batch=8)
    ex = eager.example(3, seed=2)
    t0 = time.perf_counter()
    out = comp(*ex)
    print(f"torch.compile: first call {time.perf_counter() - t0:.1f} s")
    np.testing.assert_allclose(out, eager(*ex), atol=1e-5, rtol=0)
    ex2 = eager.example(4, "x", seed=3)  # same bucket: no recompile, different words and rows
    np.testing.assert_allclose(comp(*ex2), eager(*ex2), atol=1e-5, rtol=0)
