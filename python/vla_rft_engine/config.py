"""Dataclass configs: defaults equal the paper's tables, YAML files and `key=value` overrides on top.

    cfg = load_config(TokenizerTrainConfig, yaml_path=None, overrides=["steps=200", "model.levels=[8,5,5,5]"])
    cfg = load_config(RFTConfig, "release", command="rft")      # a preset shipped in vla_rft_engine/configs/

A config file is either flat (`key: value` for one command) or split by command: every top-level key a
`vla-rft` command name (`rft:`, `sft:`, ...), as the shipped presets are; `command` picks the section.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from .commands import COMMANDS

WRAPS = ("ddp", "fsdp2")  # multi-process wrappers of a trainable model (distributed.wrap)
T = TypeVar("T")


class UserError(Exception):
    """Something the user can fix (config, files, data, settings that diverge): the CLI prints the message as one
    line and exits 2, no traceback (VLA_RFT_DEBUG=1 shows it)."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


class Diverged(UserError, FloatingPointError):
    """Training hit a non-finite loss or gradient; nothing from that step on was applied or saved."""


class BadFileError(UserError, RuntimeError):
    """A file is corrupt, of another format, or not loadable without running code (weights_only)."""

    @classmethod
    def of(cls, what: str, e: BaseException, fix: str) -> "BadFileError":
        """'<what> (<the loader's first line>); <fix>': one line, whatever the loader raised."""
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return cls(f"{what} ({why}); {fix}")


class NonFiniteError(ValueError):
    """A tensor holds NaN/Inf (models.encoders.check_finite): bad input, or inside a training step, divergence."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaves(obj, prefix: str = ""):
    """(dotted key, value, owning config, field name) for every non-section field, depth first."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, prefix + f.name + ".")
        else:
            yield prefix + f.name, v, obj, f.name


def _valid_keys(obj) -> list[str]:
    return [k for k, *_ in _leaves(obj)]


def field_docs(cls) -> dict[str, str]:
    """{field: its trailing `# comment` in the class source}: the one-line descriptions `--help` prints."""
    import inspect
    import re
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pat = re.compile(r"^\s+(\w+)\s*:[^=#]+(?:=[^#]*)?#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for m in map(pat.match, src.splitlines()) if m}


def describe_keys(cfg) -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every leaf of a config dataclass."""
    return [(k, v, field_docs(type(owner)).get(name, "")) for k, v, owner, name in _leaves(cfg)]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Cast a parsed YAML scalar/list to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {tp}")
    if tp is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [s for s in value.split(",") if s]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}") from None
    return value


# keys that moved to their one owner (issue: one owner per setting); the error names the new home
MOVED_KEYS = {"policy.logprob_reduce": "vla-rft rft's grpo.logprob_reduce (Eq. 8 is Stage II's)",
              "weight_decay": "grpo.weight_decay (action head) and grpo.sigma_weight_decay (Sigma Net)"}


def set_key(cfg, key: str, raw: Any) -> None:
    """Set a dotted key on a (nested) dataclass, type-checked. Unknown keys list the valid ones."""
    parts = key.split(".")
    obj = cfg
    for i, p in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        if p not in names:
            import difflib
            keys = _valid_keys(cfg)
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(k) for k in near)}? " if near else ""
            if key in MOVED_KEYS:
                hint = f"it is {MOVED_KEYS[key]} now; "
            raise ConfigError(f"unknown config key '{key}'; {hint}`--help` lists the {len(keys)} keys")
        if i < len(parts) - 1:
            obj = getattr(obj, p)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config key '{key}': '{p}' is not a section")
    tp = _field_types(type(obj))[parts[-1]]
    if dataclasses.is_dataclass(getattr(obj, parts[-1])):
        if not isinstance(raw, dict):
            raise ConfigError(f"config key '{key}' is a section; set its fields as {key}.<name>=value")
        for k, v in raw.items():
            set_key(cfg, f"{key}.{k}", v)
        return
    if isinstance(raw, str):
        parsed = yaml.safe_load(raw) if raw != "" else ""
        if tp is str:  # keep strings verbatim ("001" stays "001")
            parsed = raw
        raw = parsed
    setattr(obj, parts[-1], _coerce(raw, tp, key))


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value (for example steps=100)")
        k, v = o.split("=", 1)
        out.append((k.strip(), v))
    return out


PRESETS_DIR = Path(__file__).parent / "configs"


def preset_names() -> list[str]:
    """The presets shipped with the package (vla_rft_engine/configs/NAME.yaml), usable as `--config NAME`."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """An existing file as given; else a bare name (no folder, no .yaml) as a shipped preset."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    s = str(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or "/" in s or "\\" in s:
        raise ConfigError(f"config file {p} does not exist")
    if (PRESETS_DIR / f"{s}.yaml").is_file():
        return PRESETS_DIR / f"{s}.yaml"
    raise ConfigError(f"config {s!r} is neither a file nor a shipped preset ({', '.join(preset_names())})")


def read_config_file(name_or_path: str | Path, command: str | None = None) -> dict:
    """The key: value settings of a config file or preset, for `command` when the file is split by command."""
    p = resolve_config_path(name_or_path)
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of key: value")
    from .commands import COMMANDS  # the section names are the commands'
    if data and all(k in COMMANDS for k in data):  # split by command
        if command is None or command not in data:
            has = ", ".join(data)
            want = f"no section for `vla-rft {command}`" if command else "one section per command"
            raise ConfigError(f"config {name_or_path} has {want}; its sections: {has}")
        data = data[command] or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config {name_or_path}: section {command!r} must hold a mapping of key: value")
    return data


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Iterable[str] = (),
                command: str | None = None) -> T:
    """cls's defaults, then the file (a path or a shipped preset's name; `command` picks its section), then the
    key=value overrides; validated."""
    cfg = cls()
    if yaml_path is not None:
        for k, v in read_config_file(yaml_path, command).items():
            set_key(cfg, k, v)
    for k, v in parse_overrides(overrides):
        set_key(cfg, k, v)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict keyed by its dotted override keys."""
    out: dict = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


RESUME_RUNTIME_KEYS = frozenset({"out_dir", "steps", "stop_at", "log_every", "ckpt_every", "eval_every", "resume",
                                  "progress", "device", "distributed"})  # may differ between a run and its resume
# (distributed: checkpoints hold the full state in one layout whatever the wrap, see distributed.model_state)


def check_resume_config(saved: dict | None, cfg, out_dir, runtime=RESUME_RUNTIME_KEYS,
                        start_over: str = "resume=false") -> None:
    """A resumed run must have the settings it was started with: otherwise a ConfigError naming the keys."""
    if not saved:
        return
    old, new = flat_dict(saved), flat_dict(to_dict(cfg))
    diff = [k for k in sorted(set(old) | set(new)) if k not in runtime and old.get(k) != new.get(k)]
    if diff:
        show = ", ".join(f"{k}: {old.get(k)!r} before vs {new.get(k)!r} now" for k in diff[:4])
        raise ConfigError(f"{out_dir} holds a run with other settings ({show}{', ...' if len(diff) > 4 else ''}); "
                          f"pass the same settings to resume, or use another out_dir ({start_over} to start over)")


def save_config(cfg, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(to_dict(cfg), indent=2))
    else:
        path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(cls: type[T], data: dict) -> T:
    cfg = cls()
    for k, v in data.items():
        set_key(cfg, k, v)
    return cfg


# --- a command's arguments: `--config FILE.yaml | PRESET`, key=value overrides, --help (every command module's
# main(argv) parses with these; cli.py only dispatches) ---
def split_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """-> (--config's file path or preset name, key=value overrides, whether --help was asked)."""
    cfg, over, want_help = None, [], False
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--config":
            cfg = next(it, None)
        elif a.startswith("--config="):
            cfg = a.split("=", 1)[1]
        else:
            over.append(a)
    return cfg, over, want_help


def parse_command(cmd: str, cls, argv: list[str] | None):
    """A command's config from `--config FILE.yaml | PRESET` and key=value overrides; None after printing --help
    (with --config, the help shows the file's values as the defaults)."""
    path, over, want_help = split_args(list(argv or []))
    if want_help:
        print_config_help(cmd, cls() if path is None else load_config(cls, path, command=cmd))
        return None
    return load_config(cls, path, over, command=cmd)


def print_config_help(cmd: str, cfg) -> None:
    """Every key with its default and description; keys the command fills in itself are marked."""
    owned = set(getattr(cfg, "SET_BY_COMMAND", ()))
    rows = describe_keys(cfg)
    w = min(max(len(k) + len(str(v)) for k, v, _ in rows) + 4, 60)
    print(f"usage: vla-rft {cmd} [--config FILE.yaml | PRESET] [key=value ...]\n\n{COMMANDS[cmd][1]}\n\nkeys (default):")
    for k, v, doc in rows:
        if k in owned:
            doc = f"[set by {cmd}] " + doc
        shown = (v or '""') if isinstance(v, str) else json.dumps(v, default=str)  # as typed on the command line
        print(f"  {k + '=' + shown:<{w}} {doc}".rstrip())
