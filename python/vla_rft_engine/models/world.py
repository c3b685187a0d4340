"""The learned world: visual tokenizer + action discretizer + token layout + world model, behind one object.

    world = LearnedWorld.load("runs/wm/world_model")                       # what pretrain-wm writes
    frames = world.imagine(start_frames, actions, temperature=1.0, top_p=0.8, generator=g)

`imagine` is the only caller of the rollout engine in the package: frames -> tokens -> prompt -> engine
rollout -> tokens -> frames. Each rollout's prompt ends with its OWN first action (paper Eq. 10): the N
rollouts of one start frame share the context frame and the first dynamics frame, prefilled once, and feed
their own a_0 as their first suffix chunk.

A world directory is a Hugging Face LlamaForCausalLM directory (config.json + weights, loadable by
transformers) plus `action_ranges.json`, `world.json` (the manifest: token layout, the tokenizer's config
and content hash, the action ranges) and `tokenizer/` (a copy of the tokenizer it was trained on).
Loading checks every pairing, so a world model never silently reads another tokenizer's tokens.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..layout import ActionDiscretizer, TokenLayout
from ..utils import atomic_write_text

MANIFEST, FORMAT = "world.json", "vla-rft-world/1"


def tokenizer_hash(tok) -> str:
    """Content hash of a tokenizer: its config and every weight, in a fixed order."""
    from ..config import to_dict
    h = hashlib.sha256(json.dumps(to_dict(tok.cfg), sort_keys=True).encode())
    for k, v in sorted(tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def world_manifest(tok, disc: ActionDiscretizer, action_dropout: float | None = None) -> dict:
    from ..config import to_dict
    man: dict[str, Any] = {"format": FORMAT, "layout": asdict(tok.layout), "tokenizer_config": to_dict(tok.cfg),
           "tokenizer_sha256": tokenizer_hash(tok), "action_ranges": disc.state_dict()}
    if action_dropout is not None:  # > 0: the null action id was trained, so action guidance means something
        man["action_dropout"] = action_dropout
    return man


def check_pairing(wm_cfg, layout: TokenLayout, disc: ActionDiscretizer, where: str = "") -> None:
    """Vocabulary, code count and action tokens of the three parts must agree."""
    at = f" ({where})" if where else ""
    if wm_cfg.vocab_size != layout.vocab_size or wm_cfg.num_codes != layout.num_codes:
        raise ValueError(f"world model vocab {wm_cfg.vocab_size} / {wm_cfg.num_codes} codes != tokenizer layout "
                         f"{layout.vocab_size} / {layout.num_codes}{at}: the world model was trained on another "
                         "tokenizer; pass the tokenizer it was trained with")
    if disc.action_dim != layout.action_dim or disc.num_bins != layout.num_action_bins:
        raise ValueError(f"action ranges ({disc.action_dim} dims x {disc.num_bins} bins) do not fit the token layout "
                         f"({layout.action_dim} x {layout.num_action_bins}){at}")


class LearnedWorld:
    def __init__(self, tokenizer, world_model, discretizer: ActionDiscretizer, action_dropout: float | None = None):
        check_pairing(world_model.config, tokenizer.layout, discretizer)
        self.tokenizer, self.world_model, self.discretizer = tokenizer, world_model, discretizer
        self.action_dropout = action_dropout  # from the manifest; None: not recorded

    @property
    def layout(self) -> TokenLayout:
        return self.tokenizer.layout

    @property
    def image_size(self) -> int:
        return self.tokenizer.cfg.image_size

    @property
    def action_dim(self) -> int:
        return self.discretizer.action_dim

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        self.world_model.save_pretrained(path)
        save_world_dir(path, self.tokenizer, self.discretizer, self.action_dropout)

    @classmethod
    def load(cls, path: str | Path, tokenizer: str | Path | None = None,
             action_ranges: str | Path | ActionDiscretizer | None = None,
             device="cpu", dtype: torch.dtype = torch.float32, attn_backend: str | None = None) -> "LearnedWorld":
        """`tokenizer` / `action_ranges` default to the copies inside the world directory."""
        from .tokenizer import VisualTokenizer
        from .world_model import WorldModel
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json not found: the world directory is what `vla-rft pretrain-wm` "
                                    "writes as OUT_DIR/world_model")
        man = _read_manifest(path)
        tok_path = Path(tokenizer) if tokenizer else path / "tokenizer"
        if not VisualTokenizer.exists(tok_path):
            raise FileNotFoundError(f"no tokenizer at {tok_path}: pass tokenizer=DIR (the one the world model was "
                                    "trained on; `vla-rft pretrain-tokenizer` writes DIR/tokenizer.safetensors)")
        tok = VisualTokenizer.load(tok_path).to(device).eval()
        ar = Path(action_ranges) if isinstance(action_ranges, (str, Path)) else path / "action_ranges.json"
        if isinstance(action_ranges, ActionDiscretizer):
            disc = action_ranges
        elif ar.is_file() or action_ranges:
            disc = ActionDiscretizer.load(ar)
        elif man is not None:
            disc = ActionDiscretizer(**man["action_ranges"])
        else:
            raise FileNotFoundError(f"no action ranges at {ar}: pass action_ranges=FILE.json (written beside the "
                                    "world model by `vla-rft pretrain-wm`)")
        if man is not None:
            _check_manifest(man, tok, disc, path, tok_path)
        kw = {"attn_backend": attn_backend} if attn_backend else {}
        wm = WorldModel.from_pretrained(path, dtype=dtype, device=device, **kw)
        for p in wm.parameters():  # the learned world is frozen wherever it is used (Stage II, evaluation)
            p.requires_grad_(False)
        check_pairing(wm.config, tok.layout, disc, str(path))
        return cls(tok, wm.eval(), disc, (man or {}).get("action_dropout"))

    # ---- the one rollout path ---------------------------------------------------------------------
    def _check_start(self, start: torch.Tensor) -> None:
        s = self.image_size
        if not torch.is_tensor(start) or start.dim() != 4 or tuple(start.shape[1:]) != (3, s, s):
            raise ValueError(f"start frames must be (B, 3, {s}, {s}) floats in [0, 1] (this world's image size), got "
                             f"{tuple(start.shape) if torch.is_tensor(start) else type(start).__name__}")

    def _check_actions(self, actions: torch.Tensor, B: int) -> torch.Tensor:
        A = self.action_dim
        if not torch.is_tensor(actions) or actions.dim() not in (3, 4) or actions.shape[0] != B or actions.shape[-1] != A:
            raise ValueError(f"actions must be (B={B}, T, {A}) or (B={B}, N, T, {A}) raw actions, got "
                             f"{tuple(actions.shape) if torch.is_tensor(actions) else type(actions).__name__}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN/inf; the policy or dataset produced invalid actions")
        return actions


    @torch.no_grad()
    def imagine(self, start: torch.Tensor, actions: torch.Tensor, num_samples: int = 1, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                return_tokens: bool = False, timings: dict | None = None, guidance: float = 0.0):
        """Roll the world model out from start frames (B, 3, H, W) in [0, 1] under raw actions.

        actions (B, N, T, A): one chunk per rollout; (B, T, A): one chunk for `num_samples` rollouts each.
        a_t is the action taken at frame t (a_0 at the start frame). Returns the predicted frames
        o_1..o_T as (B, N, T, 3, H, W) in [0, 1] (and the dynamics code ids (B, N, T, n) with return_tokens).
        guidance > 0: action guidance (engine/rollout.py), for a world model trained with action_dropout.
        """
        ctx, shared, bins = self.prompt(start, actions, num_samples)
        ids = self.world_model.rollout(shared, bins[:, :, 1:].flatten(0, 1), tokens_per_frame=self.layout.dynamics_tokens,
                                       num_samples=bins.shape[1], temperature=temperature, top_p=top_p, top_k=top_k,
                                       generator=generator, row_prompt_ids=bins[:, :, 0].flatten(0, 1), timings=timings,
                                       **self._guide(guidance, bins.flatten(0, 1)))
        return self.frames(ctx, ids, bins.shape[1], bins.shape[2], return_tokens)

    def prompt(self, start: torch.Tensor, actions: torch.Tensor, num_samples: int = 1):
        """imagine's inputs as token ids -> (context codes (B, n), the prompt shared by a group: ctx + dyn(o_0)
        (B, 2n) on the world model's device, every rollout's action bins as vocabulary ids (B, N, T, A))."""
        self._check_start(start)
        B = start.shape[0]
        acts = self._check_actions(actions, B)
        if acts.dim() == 3:
            acts = acts[:, None].expand(B, num_samples, *acts.shape[1:])
        lay, dev = self.layout, self.world_model.output.weight.device
        ctx, dyn0 = self.tokenizer.encode_clip(start.to(self.tokenizer.ctx_to_code.weight.device)[:, None])  # o_0 is both
        bins = lay.bins_to_vocab(self.discretizer.encode(acts.to(dev)))  # (B, N, T, A)
        shared = torch.cat([lay.context_to_vocab(ctx), lay.dynamics_to_vocab(dyn0[:, 0])], 1).to(dev)
        return ctx, shared, bins

    def frames(self, ctx: torch.Tensor, ids: torch.Tensor, N: int, T: int, return_tokens: bool = False):
        """Generated dynamics ids (B*N, T*n) -> frames (B, N, T, 3, H, W) (and the codes (B, N, T, n)); one context
        decode per group."""
        B = ctx.shape[0]
        dyn = self.layout.vocab_to_dynamics(ids).view(B, N * T, -1)
        frames = self.tokenizer.decode(ctx, dyn).view(B, N, T, 3, self.image_size, self.image_size)
        return (frames, dyn.view(B, N, T, -1)) if return_tokens else frames

    def _guide(self, guidance: float, bins: torch.Tensor) -> dict:
        if not guidance:
            return {}
        if self.action_dropout == 0:
            raise ValueError("action guidance needs a world model trained with action_dropout > 0 (this one was "
                             "trained without: its null action token is untrained); retrain it or set guidance to 0")
        null = torch.full_like(bins, self.layout.null_action_id)
        return {"guidance": guidance, "uncond_row_prompt_ids": null[:, 0], "uncond_action_ids": null[:, 1:]}


def _read_manifest(path: Path) -> dict | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        man = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is corrupt ({e}); re-run `vla-rft pretrain-wm` or restore the file") from None
    if man.get("format") != FORMAT:
        raise ValueError(f"{f} is not a vla-rft world manifest (format={man.get('format')!r})")
    return man


def _check_manifest(man: dict, tok, disc: ActionDiscretizer, path: Path, tok_path: Path) -> None:
    want, got = man["layout"], asdict(tok.layout)
    diff = [f"{k} {want.get(k)} vs {got.get(k)}" for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    from ..config import to_dict
    cdiff = [f"{k} {man['tokenizer_config'].get(k)!r} vs {v!r}" for k, v in to_dict(tok.cfg).items()
             if man["tokenizer_config"].get(k) != v]
    if diff or cdiff:
        raise ValueError(f"tokenizer {tok_path} does not match the one world model {path} was trained with "
                         f"(manifest vs given: {'; '.join(diff + cdiff)}); pass the matching tokenizer")
    if man["tokenizer_sha256"] != tokenizer_hash(tok):
        raise ValueError(f"tokenizer {tok_path} has other weights than the one world model {path} was trained with "
                         f"(hash {tokenizer_hash(tok)} vs {man['tokenizer_sha256']}); pass the matching tokenizer")
    r = man["action_ranges"]
    if not (torch.allclose(disc.low, torch.tensor(r["low"], dtype=torch.float64))
            and torch.allclose(disc.high, torch.tensor(r["high"], dtype=torch.float64)) and disc.num_bins == r["num_bins"]):
        raise ValueError(f"action ranges differ from the ones world model {path} was trained with ({MANIFEST}); "
                         "drop action_ranges= to use the world directory's own")


def save_world_dir(path: str | Path, tok, disc: ActionDiscretizer, action_dropout: float | None = None) -> None:
    """Complete a world directory beside a saved HF world model: action ranges, tokenizer copy, manifest."""
    path = Path(path)
    disc.save(path / "action_ranges.json")
    tok.save(path / "tokenizer")
    atomic_write_text(path / MANIFEST, json.dumps(world_manifest(tok, disc, action_dropout), indent=1))


__all__ = ["LearnedWorld", "tokenizer_hash", "world_manifest", "check_pairing", "save_world_dir", "MANIFEST"]
