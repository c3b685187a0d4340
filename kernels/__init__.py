"""Triton kernels (installed as vla_rft_engine.kernels). Each op file holds the kernel, its launcher,
its PyTorch reference and, where it trains, an autograd Function."""
