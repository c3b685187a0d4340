"""The rollout engine (installed as vla_rft_engine.engine): scheduling, static KV cache, graph-captured loops."""
