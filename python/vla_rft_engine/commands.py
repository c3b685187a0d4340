"""The `vla-rft` command registry: names, modules, one-line help and config classes. Plain data, so library code
(config files split by command) can read the names without importing the CLI."""
from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vla_rft_engine.info", "print versions, devices and which optional backends are available"),
    "pretrain-tokenizer": ("vla_rft_engine.train.tokenizer", "train the FSQ/VQ visual tokenizer on frames"),
    "pretrain-wm": ("vla_rft_engine.train.world_model", "MLE pretraining of the world model (Eq. 3)"),
    "wm-eval": ("vla_rft_engine.train.wm_eval", "world-model rollout quality: MSE, PSNR, SSIM, LPIPS (Table 1)"),
    "sft": ("vla_rft_engine.train.sft", "Stage I flow-matching SFT of the policy (Eq. 4)"),
    "rft": ("vla_rft_engine.rl.rft", "Stage II GRPO fine-tuning of the policy in the frozen world model"),
    "eval": ("vla_rft_engine.eval_libero", "a policy in LIBERO: official initial states + perturbations (Tables 2-3)"),
    "quickstart": ("vla_rft_engine.quickstart", "every stage on the built-in task, then SFT vs RFT success tables"),
    "export": ("vla_rft_engine.export.command", "the deployed policy to ONNX (or a TensorRT engine on a GPU), checked"),
    "serve": ("vla_rft_engine.export.serve", "serve the policy over HTTP with request batching (onnxruntime, TensorRT, torch)"),
    "client": ("vla_rft_engine.export.client", "smoke-test a running vla-rft serve: requests, round trip, server latency"),
}


# each command's config class (module:name), importable without torch: arguments are checked, and --help
# answered, before the command's own module (and torch) is imported
CONFIGS: dict[str, str] = {
    "pretrain-tokenizer": "vla_rft_engine.train.tokenizer_config:TokenizerTrainConfig",
    "pretrain-wm": "vla_rft_engine.train.world_model_config:WMTrainConfig",
    "wm-eval": "vla_rft_engine.train.wm_eval_config:WMEvalConfig",
    "sft": "vla_rft_engine.train.sft_config:SFTConfig",
    "rft": "vla_rft_engine.rl.rft_config:RFTConfig",
    "eval": "vla_rft_engine.eval_config:EvalConfig",
    "quickstart": "vla_rft_engine.quickstart_config:QuickstartConfig",
    "export": "vla_rft_engine.export.command:ExportConfig",
    "serve": "vla_rft_engine.export.serve:ServeConfig",
    "client": "vla_rft_engine.export.client:ClientConfig",
}
