"""Sample keys: stable names derived from an input's path relative to SRC."""

from __future__ import annotations

import hashlib
import re

_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(relpath: str) -> str:
    """The key of the input at `relpath` (posix, relative to SRC), per docs/store-format.md.

    The SHA-1 suffix keeps paths that differ only in replaced characters apart, and the
    80-character cut keeps `KEY.json` inside a USTAR tar member name. A name that is not UTF-8
    reaches us as Python's surrogate-escaped str (os.fsdecode); hashing it with "surrogateescape"
    hashes the file name's own bytes.
    """
    stem, dot, ext = relpath.rpartition(".")
    if not dot or "/" in ext:
        stem = relpath
    readable = _OUTSIDE.sub("_", stem)[:80]
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{readable}-{digest[:10]}"


def order_key(key: str, seed: int) -> bytes:
    """Where the sample `key` goes in its split's shards: sorting by this gives a seeded pseudo-random
    order that depends only on the keys, so the same inputs give the same shards on every machine, a
    resumed conversion continues the same sequence, and an --append mixes its new samples among themselves."""
    return hashlib.sha1(f"{seed}:{key}".encode("utf-8", "surrogateescape")).digest()
