"""Sample keys: stable names derived from an input's path relative to SRC."""

from __future__ import annotations

import hashlib
import re

_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(relpath: str) -> str:
    """The key of the input at `relpath` (posix, relative to SRC), per docs/store-format.md.

    The SHA-1 suffix keeps paths that differ only in replaced characters apart, and the
    80-character cut keeps `KEY.json` inside a USTAR tar member name.
    """
    stem, dot, ext = relpath.rpartition(".")
    if not dot or "/" in ext:
        stem = relpath
    readable = _OUTSIDE.sub("_", stem)[:80]
    return f"{readable}-{hashlib.sha1(relpath.encode()).hexdigest()[:10]}"
