"""msn's on-disk cache, `$MSN_CACHE` (default ~/.cache/msn).

It holds GGUF conversions, the materialised default model, latency profiles and acceptance
statistics. Small JSON records are written atomically and read back only when their version
matches, so a stale or half-written file costs a re-measurement, never a wrong answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def msn_cache_dir() -> Path:
    """Where msn keeps what it converts and measures: `$MSN_CACHE` or ~/.cache/msn."""
    return Path(os.environ.get("MSN_CACHE") or Path.home() / ".cache" / "msn").expanduser()


def write_json_atomically(path: Path, data: dict[str, Any], indent: int = 2) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_versioned_json(path: Path, version: int, parse: Callable[[dict], T]) -> T | None:
    """`parse` of the record at `path`, or None when it is missing, stale or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != version:
            return None
        return parse(data)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
