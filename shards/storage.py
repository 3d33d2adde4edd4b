"""Where stores live: fsspec filesystems for local paths, NAS paths and `s3://` URLs."""

from __future__ import annotations

import os
import stat
import urllib.parse

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StoreError(Exception):
    """A user-facing problem with a source or a store; its message is one line."""


def storage_error(e: BaseException) -> str:
    """One line for a failure of storage: its type and first line; missing S3 credentials say what to set."""
    if type(e).__name__ == "NoCredentialsError":  # botocore's, by name: local stores need no botocore
        return "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def url_problem(url: str) -> str | None:
    """What is wrong with a storage URL that fsspec would take for something else, or None: a scheme with nothing
    after it (`s3://`) loses its slashes to joins and becomes the local folder `s3:`."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme and not rest.strip("/"):
        return f"{url} names no bucket or folder after {scheme}://"
    return None


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path within it for a local path or URL.

    S3 credentials and endpoint come from the usual AWS environment variables.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StoreError(f"cannot open {public_url(url)}: {e}") from None
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# What a local path that is not a regular file is, by its file type (stat.S_IFMT).
_SPECIAL_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def special_file(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """What `path` is when it is a local FIFO, socket, device or folder (through any symlinks) rather than a
    regular file, else None: such a path is never opened, as opening a FIFO waits for a writer and reading a
    device like /dev/zero never ends. Object stores hold only files. A broken symlink raises FileNotFoundError."""
    if not is_local(fs):
        return None
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else _SPECIAL_KINDS.get(stat.S_IFMT(mode), "a special file")


def shown(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` as the user gave it: a local path as is, a remote one with its scheme (fsspec paths drop it)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def public_url(url: str) -> str:
    """`url` without any user:password part, so it is safe to print or store."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part.

    Locally a temp file is renamed over it; on object stores a single PUT is atomic already.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"  # a fixed name: a rerun after a kill overwrites any leftover
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


WRITE_PROBE = ".shardtrain-write-probe"  # a fixed name: a leftover from a kill is known as ours


def check_writable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Make the folder `root` (locally; object stores have none) and write and delete a probe in it,
    so that a DEST that cannot be written is refused before any work, not at its first shard."""
    probe = join(root, WRITE_PROBE)
    try:
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except OSError as e:
        raise StoreError(f"cannot write to {public_url(url)}: {e.strerror or e}") from None


def publish_file(fs: fsspec.AbstractFileSystem, local: str, path: str) -> None:
    """Move the finished local file `local` to `path` atomically (rename, or one upload)."""
    if is_local(fs):
        os.replace(local, path)  # `local` was built beside `path`, so this is a rename
    else:
        fs.put_file(local, path)
        os.remove(local)
