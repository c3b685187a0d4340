"""The CLI checks arguments and answers --help before it imports torch (or the command's module): a typo costs
a tenth of a second, not the few seconds torch takes to import."""
import subprocess
import sys

import pytest

from vla_rft_engine.cli import COMMANDS, CONFIGS

PROBE = ("import sys\nfrom vla_rft_engine.cli import main\nrc = main(sys.argv[1:])\n"
         "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\nsys.exit(rc)")


def _run(*argv):
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("cmd", sorted(CONFIGS))
def test_bad_key_and_help_answer_without_torch(cmd):
    rc, out, err = _run(cmd, "no_such_key=1")
    assert rc == 2 and "unknown config key 'no_such_key'" in err and len(err.strip().splitlines()) == 1, err
    assert "NO_TORCH" in out
    rc, out, _ = _run(cmd, "--help")
    assert rc == 0 and f"usage: vla-rft {cmd}" in out and "NO_TORCH" in out


def test_bad_values_and_presets_are_checked_without_torch():
    for argv, needle in ((["pretrain-wm", "lr=abc"], "expected float"),
                         (["quickstart", "task=nope"], "unknown task 'nope'"),
                         (["quickstart", "--smoke", "tsk=reach"], "did you mean 'task'"),
                         (["rft", "--config", "papr"], "neither a file nor a shipped preset"),
                         (["rft", "grpo.rollouts=1"], "N >= 2")):
        rc, out, err = _run(*argv)
        assert rc == 2 and needle in err and "NO_TORCH" in out, (argv, err)


def test_every_command_with_settings_has_a_torch_free_config():
    assert set(CONFIGS) <= set(COMMANDS) and set(COMMANDS) - set(CONFIGS) == {"info"}


def test_a_source_checkout_on_sys_path_does_not_shadow_pypi_kernels():
    """`python -m vla_rft_engine.cli` from the checkout: its top-level kernels/ must not stand in for the PyPI
    `kernels` package (transformers >= 5 imports it)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    probe = ("import importlib.util, sys\nfrom vla_rft_engine import cli\n"
             "before = importlib.util.find_spec('kernels')\ncli._unshadow()\n"
             "after = importlib.util.find_spec('kernels')\n"
             "print(before.origin if before else None)\nprint(after.origin if after else None)")
    p = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    before, after = p.stdout.split()
    assert before.startswith(str(root))  # `-c` / `-m` put the checkout first: the shadowing is real
    assert after == "None" or not after.startswith(str(root))
