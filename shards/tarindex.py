"""Where each sample of a WebDataset shard lies in its tar: the `.idx` file `convert` writes beside each shard.

The format is NVIDIA DALI's (`wds2idx`, version v1.2), so `fn.readers.webdataset(index_paths=...)` reads it as is:
a first line `v1.2 N`, then one line per sample listing its members as `ext offset size name`, where `offset` is
where the member's data begins. A reader that has it finds a sample's bytes without scanning the tar, which on
object storage means reading the whole shard, once in every process that reads from it.
"""

from __future__ import annotations

import os
import tarfile

VERSION = "v1.2"
BLOCK = tarfile.BLOCKSIZE


def idx_name(shard: str) -> str:
    """The index's file name beside `shard`: DALI's, the shard's name up to its first dot (`train-000000.idx`)."""
    return shard.partition(".")[0] + ".idx"


def make_idx(tar_path: str) -> bytes:
    """The index of the local tar at `tar_path`: adjacent members with the same key are one sample."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = os.path.basename(info.name).partition(".")
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {info.offset_data} {info.size} {info.name}")
    return (f"{VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)).encode()


def idx_spans(data: bytes, samples: int, size: int) -> list[tuple[int, int]]:
    """Each sample's [start, end) in its tar of `size` bytes, from the index `data`. A sample runs from where the
    one before it ends (its members' headers first) to the end of its last member's data, padded to the tar's
    512-byte blocks. ValueError when `data` is not an index of that many samples in that tar."""
    lines = data.decode().splitlines()
    if not lines or lines[0].split() != [VERSION, str(samples)] or len(lines) != samples + 1:
        raise ValueError(f"not a {VERSION} index of {samples} samples")
    spans, start = [], 0
    for i, line in enumerate(lines[1:]):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"sample #{i}: not `ext offset size name` fields")
        end = max(int(fields[j + 1]) + int(fields[j + 2]) for j in range(0, len(fields), 4))
        end = -(-end // BLOCK) * BLOCK
        if not start < end <= size:
            raise ValueError(f"sample #{i}: span {start}-{end} outside a tar of {size} bytes")
        spans.append((start, end))
        start = end
    return spans
