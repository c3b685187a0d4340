"""`vla-rft <command> [--config FILE.yaml | PRESET] [key=value ...]`.

PRESET: a file shipped in vla_rft_engine/configs/, by name: `paper` (Tables 5-7 as written), `release` (the
authors' LIBERO run script and trainer defaults); see config.read_config_file.

Each command lives in its own module exposing `main(argv) -> int`; they are imported lazily so that
`vla-rft info` works even where an optional backend is missing.
"""
from __future__ import annotations

import importlib
import os
import sys

from .commands import COMMANDS, CONFIGS
from .config import print_config_help, split_args


def usage() -> str:
    w = max(len(c) for c in COMMANDS)
    from .config import preset_names
    lines = ["usage: vla-rft <command> [--config FILE.yaml | PRESET] [key=value ...]", "", "commands:"]
    lines += [f"  {c:<{w}}  {h}" for c, (_, h) in COMMANDS.items()]
    lines += ["", f"presets (--config NAME): {', '.join(preset_names())}",
              "`vla-rft <command> --help` lists a command's config keys and defaults."]
    return "\n".join(lines)


def _unshadow() -> None:
    """`python -m vla_rft_engine.cli` (torchrun too) from a source checkout puts the checkout on sys.path, where
    its top-level kernels/ (installed as vla_rft_engine.kernels) would shadow the PyPI `kernels` package that
    transformers >= 5 imports (policy.encoder=hf)."""
    def checkout(p: str) -> bool:
        d = os.path.abspath(p or os.curdir)
        return os.path.isfile(os.path.join(d, "setup.py")) and os.path.isfile(os.path.join(d, "kernels", "sampling.py"))
    sys.path[:] = [p for p in sys.path if not checkout(p)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _unshadow()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib
        near = difflib.get_close_matches(cmd, COMMANDS, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        print(f"vla-rft: unknown command '{cmd}'.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    from .config import UserError
    try:
        if cmd in CONFIGS and _check_args(cmd, rest):  # --help was answered
            return 0
        return int(importlib.import_module(COMMANDS[cmd][0]).main(rest) or 0)
    except (UserError, FileNotFoundError, ValueError, FloatingPointError) as e:  # config, files, data, NaN: user-fixable
        if os.environ.get("VLA_RFT_DEBUG"):
            raise
        hint = "" if isinstance(e, UserError) else " (VLA_RFT_DEBUG=1 shows the traceback)"
        print(f"vla-rft {cmd}: {_one_line(e)}{hint}", file=sys.stderr)
        return 2


def _check_args(cmd: str, argv: list[str]) -> bool:
    """Parse and validate `cmd`'s arguments with its config class alone (a ConfigError says what is wrong);
    True when --help was asked and printed."""
    from .config import load_config
    mod, name = CONFIGS[cmd].split(":")
    cls = getattr(importlib.import_module(mod), name)
    path, over, want_help = split_args(cls.expand_argv(argv) if hasattr(cls, "expand_argv") else argv)
    if want_help:
        print_config_help(cmd, cls() if path is None else load_config(cls, path, command=cmd))
        return True
    load_config(cls, path, over, command=cmd)
    return False


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
