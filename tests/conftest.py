import os
import sys

# `python -m pytest` puts the repository root on sys.path, where the top-level kernels/ folder (mapped into the
# package as vla_rft_engine.kernels) would shadow the PyPI `kernels` package that transformers >= 5 imports
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

# Triton kernels run on the CPU through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_only():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """torch's thread count for the test: the C++ CPU ops split their work over threads (the decode attention reads
    up to 4 of a thread's (row, kv head) blocks side by side: 1 thread takes every 4-, 3-, 2- and 1-block pass a
    shape makes, 2 threads split them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
