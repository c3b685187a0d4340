"""The benches run and report what they claim: tiny shapes on the CPU (speed claims live in bench/results)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    """`bench` is a folder of the checkout, not a package: put the root on sys.path, last (kernels/ must not
    shadow PyPI kernels), for each test (the CLI, run by other tests, drops a checkout root from sys.path)."""
    if str(REPO) not in sys.path:
        monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])


def _record(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_wm_rollout_bench_times_the_default_path_against_three_labelled_baselines(capsys, tmp_path):
    pytest.importorskip("transformers")
    from bench import wm_rollout
    assert wm_rollout.main(["--preset", "tiny", "--groups", "1", "--samples", "2", "--frames", "2", "--prompt-len",
                            "30", "--tokens-per-frame", "4", "--repeats", "2", "--out", str(tmp_path / "r.json")]) == 0
    rec = _record(capsys)
    assert rec == json.loads((tmp_path / "r.json").read_text())
    assert rec["attn_backend"] == "auto -> sdpa" and not rec["profiled"]
    assert set(rec["sides"]) == {"ours", "hf_kv_cached", "hf_generate_per_frame"}  # static+compile: CUDA only
    for side in rec["sides"].values():
        assert side["repeats"] == 2 and side["median_s"] > 0 and side["what"]
    fl = rec["decode_floor"]  # CPU: the step's lower bound from this core's measured GEMM and read rates
    assert fl["gemm_gflops"] > 0 and fl["stream_read_gbps"] > 0 and 0 < fl["floor_step_s"] < fl["measured_step_s"]
    # tiny preset: 2 layers x 2 KV heads x 16 dims x (K, V) x fp32, one 30-token prefix + 2 rows x 2 x (4 + 7) / 2
    assert fl["kv_bytes_per_step"] == 2 * 2 * 16 * 2 * 4 * (30 + 2 * 2 * 11 / 2)
    for s, r in rec["speedup_vs"].items():
        assert r == pytest.approx(rec["sides"][s]["median_s"] / rec["sides"]["ours"]["median_s"])
    assert "release" in rec["sides"]["hf_generate_per_frame"]["what"]


def test_grpo_step_bench_reports_phases(capsys):
    from bench import grpo_step
    assert grpo_step.main(["--repeats", "1", "--warmup", "0", "--no-lpips"]) == 0
    rec = _record(capsys)
    assert {"encode", "sde", "wm_rollout", "reward", "update", "step"} <= set(rec["median_s"])
    assert rec["wm_attn_backend"] == "auto -> sdpa"


def test_wm_action_cond_bench_compares_to_the_tokens_only_model(capsys):
    from bench import wm_action_cond
    assert wm_action_cond.main(["--groups", "1", "--samples", "2", "--frames", "2", "--prompt-len", "30",
                                "--tokens-per-frame", "4", "--repeats", "2"]) == 0
    rec = _record(capsys)
    assert set(rec["sides"]) == {"action_cond", "tokens_only"} and rec["vocab_size"] == 738
    for side in rec["sides"].values():
        assert len(side["times_s"]) == 2 and side["median_s"] > 0 and side["what"]
    assert rec["overhead_vs_tokens_only"] == pytest.approx(rec["sides"]["action_cond"]["median_s"]
                                                           / rec["sides"]["tokens_only"]["median_s"])


def test_cpu_inference_bench_times_the_default_paths_against_what_they_replaced(capsys):
    from bench import cpu_inference
    assert cpu_inference.main(["--contexts", "1", "--frames", "3", "--clips", "2", "--rows", "4", "--vocab", "300",
                               "--repeats", "2"]) == 0
    rec = _record(capsys)
    assert set(rec["cases"]) == {"tokenizer_decode", "tokenizer_encode", "sampling_flat", "sampling_peaked",
                                 "gumbel", "decode_attention_S30", "decode_attention_S290", "decode_attention_S560",
                                 "decode_gemms", "decode_layers_S290"}
    for case in rec["cases"].values():
        assert case["default"]["what"] and case["baseline"]["what"] and case["default"]["median_s"] > 0
        assert case["ratio"] == case["default"]["median_s"] / case["baseline"]["median_s"]
    assert rec["cases"]["tokenizer_decode"]["max_abs_diff"] < 1e-5  # the same frames
    assert rec["cases"]["tokenizer_encode"]["ids_differing"] == 0
    assert all(rec["cases"][f"decode_attention_S{S}"]["max_abs_diff"] < 1e-5 for S in (30, 290, 560))
    assert rec["cases"]["decode_gemms"]["max_abs_diff"] < 1e-4  # the same products, summed in another order
    assert rec["cases"]["decode_layers_S290"]["max_abs_diff"] < 1e-4  # the same 4 layers (C++ vs torch ops)
    assert rec["cases"]["gumbel"]["max_abs_diff"] < 1e-5


def test_every_suite_bench_runs_as_a_script(tmp_path):
    """suite.py runs each bench as `python bench/<name>.py` (the bench folder is not an installed package), from
    any directory: each must find `bench.common` from its own path. `--help` runs the imports."""
    import subprocess
    import sys
    from bench.suite import BENCHES, ROOT
    for name in BENCHES:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--help"], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0 and "usage" in r.stdout, (name, r.stderr[-1500:])


def test_suite_table_picks_ratios():
    from bench.suite import headline
    rec = {"speedup_vs": {"hf_kv_cached": 3.2}, "sides": {"ours": {"rollouts_per_s": 10.0, "median_s": 1.0}},
           "decode": {"roofline_fraction": 0.61}, "device": "x"}
    txt = headline(rec)
    assert "speedup_vs.hf_kv_cached=3.2" in txt and "roofline_fraction=0.61" in txt and "median_s" not in txt
    # vq_decode's record: cases as a list, named by "case"
    rec = {"results": {"cpu": {"cases": [{"case": "dyn", "ratio_ext_over_ref": 0.35, "ext_median_s": 0.1}]}}}
    assert headline(rec) == "results.cpu.cases.dyn.ratio_ext_over_ref=0.35"
