"""vla-rft-engine: reinforcement fine-tuning of VLA policies inside a learned world model (VLA-RFT)."""
__version__ = "0.1.0"
