"""Export of the deployed policy: ONNX (checker, onnxruntime == PyTorch within 1e-4 in fp32, dynamic batch)."""
import numpy as np
import pytest
import torch

from vla_rft_engine.export.onnx_export import DeployedPolicy, export_onnx, onnx_session, run_onnx
from vla_rft_engine.models.encoders import hash_tokens
from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install '.[onnx]')")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    pol = VLAPolicy(PolicyConfig(d_model=32, depth=1, heads=2, z_dim=32, enc_channels=8, sigma_d_model=16,
                                 sigma_depth=1, chunk_len=4)).eval()
    acts, prop = torch.randn(50, 7) * 0.3, torch.randn(50, 8)
    pol.set_norm_stats(acts, prop)
    path = export_onnx(pol, tmp_path_factory.mktemp("onnx") / "policy.onnx", image_size=32)
    return pol, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch):
    pol, path = exported
    model = DeployedPolicy(pol)
    ex = model.example_inputs(batch=batch, image_size=32, instruction="put the blue block on the green zone")
    with torch.no_grad():
        ref = model(*ex).numpy()
    out = run_onnx(onnx_session(path), *ex)
    assert out.shape == (batch, 4, 7)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_deployed_graph_is_policy_act(exported):
    """The exported computation is policy.act (encoder -> K Euler steps -> raw units) with the noise given."""
    pol, _ = exported
    g = torch.Generator().manual_seed(4)
    img = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=g)
    prop = torch.randn(2, 8, generator=g)
    words = ["reach the red zone", "push the yellow block"]
    act = pol.act(img, words, prop, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dep = DeployedPolicy(pol)(img, hash_tokens(words, pol.encoder.vocab_buckets), prop, noise)
    torch.testing.assert_close(dep, act, atol=1e-5, rtol=0)


def test_export_command(tmp_path, capsys):
    from vla_rft_engine.cli import main as cli
    from test_sft import TINY
    assert cli(["sft", f"out_dir={tmp_path / 'sft'}", "steps=2", *TINY]) == 0
    out = tmp_path / "deploy" / "policy.onnx"
    assert cli(["export", f"policy={tmp_path / 'sft' / 'ckpt.pt'}", f"out={out}", "image_size=16"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "onnx.checker passed" in text
    errs = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "max |diff|" in line]
    assert len(errs) == 2 and max(errs) <= 1e-4
    assert cli(["export", "policy=", "format=onnx"]) == 2
    assert "export needs policy=" in capsys.readouterr().err
    if not torch.cuda.is_available():  # TensorRT: a clear refusal without a GPU
        assert cli(["export", f"policy={tmp_path / 'sft' / 'ckpt.pt'}", f"out={out}", "format=tensorrt"]) == 2
        err = capsys.readouterr().err
        assert "format=tensorrt:" in err and "format=onnx works everywhere" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and the tensorrt package")
def test_tensorrt_engine_matches_pytorch(exported, tmp_path):
    pytest.importorskip("tensorrt", reason="needs the tensorrt package")
    from vla_rft_engine.export.onnx_export import INPUTS
    from vla_rft_engine.export.tensorrt_build import build_tensorrt, run_tensorrt
    pol, path = exported
    for fp16, tol in ((False, 1e-3), (True, 2e-2)):
        eng = build_tensorrt(path, tmp_path / f"p{int(fp16)}.engine", fp16=fp16, max_batch=8)
        ex = DeployedPolicy(pol).example_inputs(batch=4, image_size=32)
        with torch.no_grad():
            ref = DeployedPolicy(pol)(*ex).numpy()
        out = run_tensorrt(eng, dict(zip(INPUTS, (t.numpy() for t in ex))))["actions"]
        np.testing.assert_allclose(out, ref, atol=tol, rtol=0)
