"""The configuration a resumable run is tied to: stored beside its checkpoints, checked on resume.

A run started again with the same configuration carries on from its checkpoints; with another
one it refuses to mix results, naming the keys that differ (``check_config``), and the user picks
another output or ``--fresh``.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional


def canonical(config: Mapping) -> dict:
    """The config as plain JSON values (tuples -> lists, other objects -> str), so saved and new compare equal."""
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def differences(a: Mapping, b: Mapping) -> str:
    """The keys whose values differ between two configs, sorted and comma-separated."""
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def check_config(saved: Optional[Mapping], config: Mapping, holder: str, remedy: str) -> None:
    """ValueError unless ``saved`` (None: nothing saved) equals ``config``.

    The message reads "<holder> with other settings (differs in: <keys>); <remedy>", e.g. holder
    "out/removal holds a run of 'removal'", remedy "use another --out directory or --fresh to discard it".
    """
    if saved is not None and dict(saved) != dict(config):
        raise ValueError(f"{holder} with other settings (differs in: {differences(saved, config)}); {remedy}")
