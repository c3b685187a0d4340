"""The rollout engine (installed as vla_rft_engine.engine): static KV cache with a group-shared prompt
prefix, per-frame decode loop with action prefill, CUDA-graph captured decode steps, attention backends.
The entry point is `vla_rft_engine.engine.rollout.rollout` (the module keeps its name)."""
from .kv_cache import RolloutCache  # noqa: F401
