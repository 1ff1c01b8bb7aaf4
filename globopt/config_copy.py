"""The archive's own copy of a run's config, and what a resume may change in it.

The run directory's ``config.yaml`` is for people to read; a hand edit there must not change what the
archive's candidates mean (a resumed Cu4Au4 search appending to a Cu2Au2 archive). So the archive keeps
the validated config it was made with, and every resume compares ``config.yaml`` and any new config
against that copy: only the keys in RESUMABLE_CHANGES may differ.
"""

from __future__ import annotations

from typing import Any

import yaml

from globopt.config import ConfigError, RunConfig, parse_config

# The archive's meta key holding the config (YAML text of the validated config).
CONFIG_META = "config"

# Config keys that may change between a run and its resume without invalidating what was computed.
RESUMABLE_CHANGES = frozenset({"budget", "workers", "output"})


def stored_config(text: str, source: str, check_environment: bool = True) -> RunConfig:
    """The config an archive stored; ConfigError (naming ``source``) when it no longer validates."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not a config mapping")
    return parse_config(data, source=source, check_environment=check_environment)


def comparable(text: str) -> dict[str, Any]:
    """A stored config as a plain dict, with the defaults of this version filled in where it still parses.

    Filling defaults keeps a resume by a newer globopt (which may add keys) from reading every added key as
    a change; parsing skips the environment checks because only the values matter here.
    """
    try:
        return stored_config(text, "stored config", check_environment=False).model_dump(mode="json")
    except ConfigError:
        data = yaml.safe_load(text)
        return data if isinstance(data, dict) else {}


def forbidden_changes(stored: dict[str, Any], new: RunConfig) -> list[str]:
    """Differences outside RESUMABLE_CHANGES, as 'key: old -> new' lines (dotted keys, leaves only)."""
    changes: list[str] = []
    _diff(stored, new.model_dump(mode="json"), "", changes)
    return [c for c in changes if c.split(".")[0].split(":")[0] not in RESUMABLE_CHANGES]


def _diff(old: Any, new: Any, prefix: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            _diff(
                old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key), out
            )
        return
    if old != new:
        out.append(f"{prefix}: {_short(old)} -> {_short(new)}")


_ABSENT = "(absent)"


def _short(value: Any) -> str:
    if value is _ABSENT:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def changed_sections(changes: list[str]) -> list[str]:
    """Top-level keys named by forbidden_changes lines, in order."""
    return list(dict.fromkeys(c.split(".")[0].split(":")[0] for c in changes))
