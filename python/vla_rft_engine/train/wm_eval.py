"""`vla-rft wm-eval`: world-model rollout quality (Table 1) on demos.

For each episode: prompt = ctx(o_0) + dyn(o_0) + a_0; the WM rolls out `frames` frames from the dataset
actions a_1.. (greedy by default); the tokenizer decodes them; compare with the real frames o_1..o_T:
MSE, PSNR, SSIM, and LPIPS when its backbone weights are on disk. Writes metrics.json and a PNG strip
(real row over generated row per episode).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import parse_command
from ..config import ConfigError


@dataclass
class WMEvalConfig:
    wm: str = ""  # HF LlamaForCausalLM directory (pretrain-wm writes out_dir/world_model)
    tokenizer: str = ""
    demos: str = ""
    action_ranges: str = ""  # ActionDiscretizer json; default: WM_DIR/action_ranges.json (pretrain-wm), else fit on the demos
    out_dir: str = "runs/wm_eval"
    frames: int = 8
    episodes: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    strip_episodes: int = 4
    device: str = "auto"

    def validate(self) -> None:
        for k in ("wm", "tokenizer", "demos"):
            if not getattr(self, k):
                raise ConfigError(f"wm-eval needs {k}=<path>")
        if self.frames < 1 or self.episodes < 1:
            raise ConfigError("frames and episodes must be >= 1")


def main(argv: list[str]) -> int:
    cfg = parse_command("wm-eval", WMEvalConfig, argv)
    if cfg is None:
        return 0
    from .. import metrics
    from ..data.demos import load_demos
    from ..layout import ActionDiscretizer
    from ..models.tokenizer import VisualTokenizer
    from ..models.world_model import WorldModel
    from ..utils import resolve_device
    from ..viz import save_frame_grid

    dev = resolve_device(cfg.device)
    tok = VisualTokenizer.load(cfg.tokenizer).to(dev).eval()
    wm = WorldModel.from_pretrained(cfg.wm, device=dev)
    layout = tok.layout
    if wm.config.num_codes != layout.num_codes or wm.config.vocab_size != layout.vocab_size:
        raise ValueError(f"world model (num_codes {wm.config.num_codes}, vocab {wm.config.vocab_size}) and tokenizer "
                         f"(num_codes {layout.num_codes}, vocab {layout.vocab_size}) disagree; pair matching checkpoints")
    demos = load_demos(cfg.demos)
    video = torch.as_tensor(demos["frames"])[:cfg.episodes]
    acts = torch.as_tensor(demos["actions"]).float()
    beside_wm = Path(cfg.wm) / "action_ranges.json"
    if cfg.action_ranges:
        disc = ActionDiscretizer.load(cfg.action_ranges)
    elif beside_wm.is_file():  # the ranges the world model was trained with
        disc = ActionDiscretizer.load(beside_wm)
    else:
        print(f"wm-eval: no {beside_wm}; fitting action ranges on the demos (pass action_ranges= to match training)")
        disc = ActionDiscretizer.from_dataset(acts)
    acts = acts[:cfg.episodes]
    T = min(cfg.frames, video.shape[1] - 1)
    clip = video[:, :T + 1].permute(0, 1, 4, 2, 3).float().div(255).to(dev)  # (E, T+1, 3, H, W)
    E = clip.shape[0]
    ctx = tok.encode_context(clip[:, 0])
    dyn0 = tok.encode_dynamics(clip[:, 0], clip[:, 0])
    bins = disc.encode(acts[:, :T]).to(dev)
    prompt = torch.cat([layout.context_to_vocab(ctx), layout.dynamics_to_vocab(dyn0), layout.bins_to_vocab(bins[:, 0])], 1)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    out = wm.rollout(prompt, layout.bins_to_vocab(bins[:, 1:T]), tokens_per_frame=layout.dynamics_tokens,
                     temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
    pred = tok.decode(ctx, layout.vocab_to_dynamics(out))  # (E, T, 3, H, W)
    real = clip[:, 1:T + 1]
    a, b = pred.flatten(0, 1).float(), real.flatten(0, 1).float()
    res = {"mse": float(metrics.mse(a, b).mean()), "psnr": float(metrics.psnr(a, b).mean()),
           "ssim": float(metrics.ssim(a, b).mean()), "episodes": E, "frames": T}
    lp = metrics.load_lpips(device=dev)
    if lp is not None:
        with torch.no_grad():
            res["lpips"] = float(lp(a, b, zero_one=True).mean())
    outd = Path(cfg.out_dir)
    outd.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for e in range(min(cfg.strip_episodes, E)):
        rows += [real[e].cpu(), pred[e].cpu()]
        labels += [f"real {e}", f"wm {e}"]
    save_frame_grid(rows, outd / "rollouts.png", labels=labels)
    (outd / "metrics.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0
