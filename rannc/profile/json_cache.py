"""Measurements kept on disk between jobs as small JSON files (the links' speeds, the optimizer step's timing):
read where a readable file is there, written atomically where one was measured (a job reading beside one
writing never sees half a file), and a file that cannot be read or written is said and survived, never fatal:
the measurement is taken again."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_file(cache_dir: str, kind: str, digest: str) -> Path | None:
    """`<cache_dir>/<kind>_<digest>.json`, or None where no cache directory is set."""
    return Path(cache_dir).expanduser() / f"{kind}_{digest}.json" if cache_dir else None


def read(path: Path | None, what: str, log: Callable[[str], Any]) -> Any | None:
    """The file's JSON value, or None where there is none or it cannot be read (said through `log`)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log(f"Ignoring unreadable {what} {path} ({exc})")
        return None


def write(path: Path | None, value: Any, what: str, log: Callable[[str], Any]) -> None:
    """Write `value` as JSON through a file of this process's own, renamed into place."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    except OSError as exc:
        log(f"Could not save {what} to {path}: {exc}")
