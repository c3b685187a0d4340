"""The world model: a LLaMA decoder over the authors' token layout (REFERENCE.md), gpt-fast style.

One config dataclass, plain modules, weights interchangeable with a Hugging Face LlamaForCausalLM
directory (HF's rotate_half rotary convention is used as is, so q/k weights need no permutation).
Interactive rollouts (KV cache, group-shared prompt, Triton decoding) live in `vla_rft_engine.engine`;
`WorldModel.rollout` is a thin front door to it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from vla_rft_engine.engine.attention import BACKENDS, has_triton
from vla_rft_engine.kernels.rotary_kv import apply_rotary  # noqa: F401  (the reference lives beside its kernel)


@dataclass
class WorldModelConfig:
    vocab_size: int = 9008
    n_layer: int = 12
    dim: int = 768
    n_head: int = 12
    n_kv_head: int = 12
    intermediate_size: int = 3072
    max_position: int = 8192
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    num_codes: int = 4375  # generated frame tokens are restricted to dynamics codes [0, num_codes)
    attn_backend: str = "auto"  # decode attention: auto | triton | sdpa | flash | eager (engine/attention.py)
    norm_backend: str = "auto"  # auto (triton on CUDA without grad) | torch | triton (fused RMSNorm)
    # Issue #10, off by default: add a learned projection of the preceding action block's bin values to the input
    # embedding of every token of the next frame (and of the block's last token, which predicts that frame's first
    # token). Action ids are [2*num_codes, vocab_size-2) (layout.TokenLayout); blocks are `action_dim` consecutive
    # action ids. The rollout engine carries the features across chunks (embed / action_features).
    action_cond: bool = False
    action_dim: int = 7
    # with action_cond: also feed the sum of every action block so far (the displacement since the sequence's first
    # frame), so a frame far into a rollout need not recover the gripper's position from its own generated tokens
    action_cond_sum: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def validate(self) -> "WorldModelConfig":
        if self.dim % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head} / n_kv_head {self.n_kv_head} must divide evenly")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend '{self.attn_backend}' unknown; choose one of {BACKENDS}")
        if self.norm_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"norm_backend '{self.norm_backend}' unknown; choose auto, torch or triton")
        if not 0 < self.num_codes <= self.vocab_size:
            raise ValueError(f"num_codes {self.num_codes} must lie in (0, vocab_size={self.vocab_size}]")
        return self

    @classmethod
    def preset(cls, name: str, **overrides) -> "WorldModelConfig":
        presets = {
            "paper": cls(),  # Table 5: ~138M parameters
            "small": cls(n_layer=4, dim=256, n_head=4, n_kv_head=4, intermediate_size=1024),
            "cpu": cls(n_layer=3, dim=128, n_head=4, n_kv_head=2, intermediate_size=384, max_position=2048),
            "tiny": cls(n_layer=2, dim=64, n_head=4, n_kv_head=2, intermediate_size=128, max_position=2048),
        }
        if name not in presets:
            raise ValueError(f"unknown world-model preset '{name}'; choose one of {sorted(presets)}")
        return replace(presets[name], **overrides).validate()

    # --- Hugging Face LlamaConfig <-> ours ---
    def to_hf_dict(self) -> dict:
        extra = ({"vla_rft_action_cond": True, "vla_rft_action_dim": self.action_dim,
                  "vla_rft_action_cond_sum": self.action_cond_sum} if self.action_cond else {})
        return extra | {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.dim, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim, "hidden_act": "silu",
                "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
                "rope_theta": self.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                "bos_token_id": self.vocab_size - 2, "eos_token_id": self.vocab_size - 1,
                "pad_token_id": self.vocab_size - 1, "vla_rft_num_codes": self.num_codes}

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "WorldModelConfig":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope type {rope.get('rope_type')} is not supported (only default LLaMA rotary)")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("only LLaMA with SiLU MLP and no biases is supported")
        hd = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        if hd * d["num_attention_heads"] != d["hidden_size"]:
            raise ValueError(f"head_dim {hd} x heads {d['num_attention_heads']} != hidden_size {d['hidden_size']}")
        kw = dict(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], dim=d["hidden_size"],
                  n_head=d["num_attention_heads"], n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"],
                  intermediate_size=d["intermediate_size"], max_position=d.get("max_position_embeddings", 8192),
                  rms_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
                  num_codes=d.get("vla_rft_num_codes", 4375), action_cond=bool(d.get("vla_rft_action_cond", False)),
                  action_dim=d.get("vla_rft_action_dim", 7),
                  action_cond_sum=bool(d.get("vla_rft_action_cond_sum", False)))
        kw.update(overrides)
        return cls(**kw).validate()


_TRITON = has_triton()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.backend == "triton" or (self.backend == "auto" and x.is_cuda and _TRITON)
        if fused and not torch.is_grad_enabled():
            from vla_rft_engine.kernels.rmsnorm import rmsnorm
            return rmsnorm(x, self.weight, self.eps)
        xf = x.float()  # HF order: normalise in fp32, cast, then scale
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_tables(cfg: WorldModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (max_position, head_dim/2) in fp32, computed the way HF does (same rounding)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    freqs = torch.arange(cfg.max_position, device=device).float()[:, None] * inv[None, :]
    return freqs.cos(), freqs.sin()


class Attention(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.dim, bias=False)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, hd

    def forward(self, x, cos, sin, layer: int, cache=None):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_head, self.head_dim)
        k = self.wk(x).view(B, L, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, L, self.n_kv_head, self.head_dim)
        if cache is not None:  # engine: rotary + cache write + cached attention
            y = cache.attend(layer, q, k, v, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               enable_gqa=self.n_head != self.n_kv_head).transpose(1, 2)
        return self.wo(y.reshape(B, L, -1))


class FeedForward(nn.Module):  # SwiGLU: w2(silu(w1 x) * w3 x)
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.rms_eps, cfg.norm_backend)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_eps, cfg.norm_backend)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, layer, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, cache)
        return x + self.feed_forward(self.ffn_norm(x))


# our parameter name <- HF LlamaForCausalLM name
_HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(ours: str) -> str:
    if ours.startswith("action_proj."):  # action conditioning (config.action_cond; no HF counterpart)
        return "vla_rft." + ours
    if ours.startswith("layers."):
        _, i, rest = ours.split(".", 2)
        mod, leaf = rest.rsplit(".", 1)
        return f"model.layers.{i}.{_HF_LAYER[mod]}.{leaf}"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[ours]


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps, cfg.norm_backend)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        n_feat = cfg.action_dim * (2 if cfg.action_cond_sum else 1)
        self.action_proj = (nn.Sequential(nn.Linear(n_feat, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
                            if cfg.action_cond else None)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 tables, not a buffer: .to(bf16) must not round them
        self._fused: tuple | None = None  # (weights key, packed per-layer weights); see fused_weights

    def fused_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (wqkv, w13): q/k/v and gate/up weights packed row-wise, for one matmul each in decode.

        The parameters (and so the HF save/load format and training) stay separate; the packed copies are
        rebuilt whenever a parameter is replaced or updated in place (tracked by storage and version counter).
        """
        parts = [(b.attention.wq.weight, b.attention.wk.weight, b.attention.wv.weight, b.feed_forward.w1.weight,
                  b.feed_forward.w3.weight) for b in cast("list[Block]", self.layers)]
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for ws in parts for w in ws)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                packed = [(torch.cat(ws[:3]), torch.cat(ws[3:])) for ws in parts]
            self._fused = (key, packed)
        return self._fused[1]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != positions.device:
            self._rope = rotary_tables(self.config, positions.device)
        return self._rope[0][positions], self._rope[1][positions]

    def is_action(self, ids: torch.Tensor) -> torch.Tensor:
        """Where ids are action bins (is_action_id), for callers that hold the model, not its module."""
        return is_action_id(ids, self.config)

    def check_ids(self, ids: torch.Tensor, what: str = "input_ids") -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must be an integer tensor of vocabulary ids, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{what} holds ids in [{int(ids.min())}, {int(ids.max())}], outside the vocabulary "
                             f"[0, {self.config.vocab_size}); tokenize with the layout the model was trained on")

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """Final-normed hidden states (B, L, dim) for ids at `positions` (B, L)."""
        if cache is None and positions.numel() and int(positions.max()) >= self.config.max_position:
            raise ValueError(f"sequence reaches position {int(positions.max())}, the model has {self.config.max_position}")
        x = self.embed(ids, cache)
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache)
        return self.norm(x)

    def embed(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Input embeddings (B, L, dim): token embeddings, plus the action conditioning when config.action_cond.
        With a cache (the rollout engine's), the features carry over chunks in `cache.action_carry`, in place once
        it exists (so a captured CUDA graph replays it); its rows are the cache's current rows."""
        x = self.tok_embeddings(ids)
        if self.action_proj is None:
            return x
        # carry: (last A ids, features, has, the features' projection where a block has ended (B, dim), else 0)
        carry = getattr(cache, "action_carry", None)
        if (carry is not None and ids.device.type == "cpu" and getattr(cache, "s0_host", 0) is not None and ids.shape[1] == 1
                and not is_action_id(ids, self.config).any()):
            # one frame token, checked on the host for free (eager CPU steps; never under a graph's bookkeeping, where
            # the cache keeps no host mirror): it keeps the carried features, so their projection is
            # reused instead of re-deriving both every decode step (~35 small ops: +15% on a CPU rollout, see
            # bench/results/wm_action_cond_cpu.json)
            tail, on_proj = carry[0], carry[3]
            tail.copy_(torch.cat([tail[:, 1:], ids], 1))
            return x + on_proj[:, None]
        feat, on, new = action_features(ids, self.config, None if carry is None else carry[:3])
        proj = self.action_proj(feat.to(x.dtype))
        if cache is not None:
            new = (*new, proj[:, -1] * new[2][:, None].to(x.dtype))
            if carry is None:
                cache.action_carry = new
            else:
                for c, n in zip(carry, new):
                    c.copy_(n)
        return x + proj * on[..., None].to(x.dtype)

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward (training / scoring): (B, L) -> logits (B, L, V)."""
        self.check_ids(input_ids)
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        return self.output(self.hidden(input_ids, pos))

    forward = forward_logits

    @torch.no_grad()
    def rollout(self, prompt_ids, action_ids, tokens_per_frame: int = 64, num_samples: int = 1, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, generator=None, return_logprobs: bool = False, prompt_lengths=None,
                use_cuda_graph: bool | None = None, max_seq_len: int | None = None, cpu_fast: bool | None = None,
                row_prompt_ids=None, timings: dict | None = None, **guidance):
        """Interactive rollout; see `vla_rft_engine.engine.rollout.rollout` for the full contract (`guidance`:
        guidance=, uncond_row_prompt_ids=, uncond_action_ids=).

        Generated frame tokens are restricted to dynamics codes [0, config.num_codes): all other logits are
        masked before sampling, so every output id decodes as a frame token.
        """
        from vla_rft_engine.engine.rollout import rollout
        return rollout(self, prompt_ids, action_ids, tokens_per_frame=tokens_per_frame, num_samples=num_samples,
                       temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                       return_logprobs=return_logprobs, prompt_lengths=prompt_lengths, use_cuda_graph=use_cuda_graph,
                       max_seq_len=max_seq_len, cpu_fast=cpu_fast, row_prompt_ids=row_prompt_ids, timings=timings,
                       **guidance)

    # --- Hugging Face checkpoints ---
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", config: WorldModelConfig | str | None = None,
                        **overrides) -> "WorldModel":
        """Load a LlamaForCausalLM directory. `config` (a preset name or config) must agree with config.json."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json not found; expected a Hugging Face LlamaForCausalLM directory")
        hf = _read_json(path / "config.json")
        file_cfg = WorldModelConfig.from_hf_dict(hf, **{k: v for k, v in overrides.items() if k in _RUNTIME})
        if config is not None:
            want = WorldModelConfig.preset(config) if isinstance(config, str) else config
            keys = [f.name for f in fields(WorldModelConfig) if f.name not in _RUNTIME]
            bad = [f"{k}: config {getattr(want, k)} vs checkpoint {getattr(file_cfg, k)}" for k in keys
                   if getattr(want, k) != getattr(file_cfg, k)]
            if bad:
                raise ValueError(f"world-model config does not match {path}/config.json ({'; '.join(bad)}); "
                                 "use the preset the checkpoint was trained with or pass config=None")
            file_cfg = replace(want, **{k: v for k, v in overrides.items() if k in _RUNTIME}).validate()
        state = _read_hf_weights(path)
        with torch.device("meta"):
            model = cls(file_cfg)
        ours = {n: p for n, p in model.state_dict().items()}
        if "lm_head.weight" not in state and hf.get("tie_word_embeddings") and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing = [hf_name(n) for n in ours if hf_name(n) not in state]
        extra = sorted(set(state) - {hf_name(n) for n in ours} - {k for k in state if "rotary_emb" in k})
        shape = [f"{hf_name(n)} {tuple(state[hf_name(n)].shape)} vs expected {tuple(p.shape)}" for n, p in ours.items()
                 if hf_name(n) in state and state[hf_name(n)].shape != p.shape]
        if missing or extra or shape:
            raise ValueError(f"weights in {path} do not match the config: missing {missing[:8]}, unexpected {extra[:8]}, "
                             f"shape mismatch {shape[:8]}; check config.json against the weights file")
        model.load_state_dict({n: state[hf_name(n)] for n in ours}, assign=True)
        model = model.to(device=device, dtype=dtype).eval()
        model.fused_weights()  # pack at load time (rebuilt automatically if the weights change later)
        return model

    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = str(self.output.weight.dtype).split(".")[-1]
        (path / "config.json").write_text(json.dumps({**self.config.to_hf_dict(), "torch_dtype": dtype}, indent=2))
        tensors = {hf_name(n): p.detach().cpu().contiguous() for n, p in self.state_dict().items()}
        tmp = path / ".model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / "model.safetensors")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def is_action_id(ids: torch.Tensor, cfg: WorldModelConfig) -> torch.Tensor:
    """Where ids are action bins: the ids after the 2 * num_codes code ids, before the last two special ids."""
    return (ids >= 2 * cfg.num_codes) & (ids < cfg.vocab_size - 2)


def action_features(ids: torch.Tensor, cfg: WorldModelConfig, carry: tuple | None = None):
    """Causal per-position action features for config.action_cond. ids (B, L) -> (feat (B, L, A) in [-1, 1],
    on (B, L) bool, carry): at position i, the bin values of the last complete block of A action ids ending at or
    before i; `on` where such a block exists and i is a non-action token or that block's last token. With
    cfg.action_cond_sum, feat (B, L, 2A) also holds the sum of every block ended at or before i.

    carry (from the previous call on the same rows, None at the sequence start) makes chunked calls equal one call
    over the whole sequence: (the last A ids, the current features (B, A or 2A), whether a block has ended (B,))."""
    A = cfg.action_dim
    a0 = 2 * cfg.num_codes
    nb = cfg.vocab_size - 2 - a0
    B, L = ids.shape
    nf = 2 * A if cfg.action_cond_sum else A
    if carry is None:  # id 0 is a context code: the sequence start reads as "no action before"
        carry = (ids.new_zeros(B, A), torch.zeros(B, nf, device=ids.device), torch.zeros(B, dtype=torch.bool,
                                                                                           device=ids.device))
    tail, c_feat, c_has = carry
    ext = torch.cat([tail, ids], 1)  # (B, A + L): chunk position i is ext index A + i
    is_act = is_action_id(ext, cfg)
    vals = torch.where(is_act, (ext - a0).float().add(0.5).div(nb).mul(2).sub(1), torch.zeros((), device=ids.device))
    win = vals.unfold(1, A, 1)[:, 1:]  # (B, L, A): values at i-A+1 .. i
    full = is_act.unfold(1, A + 1, 1)  # (B, L, A+1): flags at i-A .. i
    is_end = full[..., 1:].all(-1) & ~full[..., 0]  # a block of exactly A action ids ends at i
    pos = torch.arange(L, device=ids.device).expand(B, L)
    last = torch.where(is_end, pos, torch.full_like(pos, -1)).cummax(1).values
    mine = last >= 0  # a block ended inside this chunk; else the carried one holds
    feat = torch.where(mine[..., None], win.gather(1, last.clamp_min(0)[..., None].expand(B, L, A)), c_feat[:, None, :A])
    if cfg.action_cond_sum:
        total = (win * is_end[..., None]).cumsum(1) + c_feat[:, None, A:]
        feat = torch.cat([feat, total], -1)
    has = mine | c_has[:, None]
    on = has & (~is_act[:, A:] | is_end)
    return feat, on, (ext[:, -A:], feat[:, -1], has[:, -1])


_RUNTIME = {"attn_backend", "norm_backend"}  # settings that do not touch the weights


def _bad_file(f: Path, e: Exception):
    from ..config import BadFileError
    return BadFileError.of(f"{f} is corrupt", e, "re-run `vla-rft pretrain-wm` or restore the world-model directory")


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_file(f, e) from None


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error type for a truncated or garbled header
        raise _bad_file(f, e) from None


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return _load_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        idx = _read_json(path / "model.safetensors.index.json")
        out = {}
        for shard in sorted(set(idx["weight_map"].values())):
            out.update(_load_safetensors(path / shard))
        return out
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


def init_weights(model: WorldModel, std: float = 0.02, seed: int = 0) -> WorldModel:
    """Random init like HF (normal(0, std), norms at 1): for from-scratch pretraining and tests."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if n.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std)
    return model


__all__ = ["WorldModel", "WorldModelConfig", "RMSNorm", "apply_rotary", "rotary_tables", "init_weights", "hf_name",
           "BACKENDS"]
