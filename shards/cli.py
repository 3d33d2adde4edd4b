"""`shardtrain convert | inspect | verify` (merged into the root CLI by flows/cli.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shards.convert import ConvertOptions, convert as run_convert
from shards.progress import console
from shards.storage import StoreError, public_url, storage_error
from shards.verify import RECOVER, inspect_store, verify as run_verify

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
T = TypeVar("T")
stdout = Console()  # what a command reports; progress, summaries and errors go to stderr


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def guarded(work: Callable[[], T]) -> T:
    """Run `work`, turning the errors a user can meet into one `error: ...` line."""
    try:
        return work()
    except StoreError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; rerun the same command to finish", 130) from None
    except Exception as e:  # storage trouble (permissions, a full disk, an unreachable endpoint, credentials)
        raise fail(storage_error(e)) from None


@app.command()
def convert(
    src: str = typer.Argument(..., help="raw folder: local path or fsspec URL"),
    dest: str = typer.Argument(..., help="the store to write: local path or fsspec URL (s3://...)"),
    format: Literal["wds", "lmdb"] = typer.Option("wds"),
    layout: Literal["auto", "imagefolder", "unlabeled", "yolo"] = typer.Option("auto"),
    shard_size: str = typer.Option("256MB", help="bytes per shard (256MB, 1GB, 500KB) or samples (1000samples)"),
    workers: int | None = typer.Option(None, min=1, help="decoding processes (default: the CPU count)"),
    dask: str | None = typer.Option(
        None, help="decode and write on a Dask cluster instead: its scheduler (tcp://HOST:8786), or local:N "
                   "for N processes here (--workers is then unused)"),
    max_side: int | None = typer.Option(None, min=1, help="shrink images whose longer side is larger"),
    max_pixels: int = typer.Option(89_478_485, min=1, help="reject images with more pixels (too_large)"),
    append: bool = typer.Option(False, "--append", help="add new inputs to an existing store"),
    on_error: Literal["skip", "fail"] = typer.Option("skip"),
    seed: int = typer.Option(0, help="seed of the samples' pseudo-random order in the shards"),
    val_fraction: float | None = typer.Option(
        None, help="share of a source without split folders held out as val, by a hash of each key "
                   "[default: 0.05; on --append the store's own; 0 = all in train]"),
) -> None:
    """Convert a raw image folder into a WebDataset or LMDB shard store."""
    fields = dict(src=src, dest=dest, format=format, layout=layout, shard_size=shard_size, max_side=max_side,
                  max_pixels=max_pixels, append=append, on_error=on_error, seed=seed, val_fraction=val_fraction,
                  dask=dask)
    if workers is not None:
        fields["workers"] = workers
    try:
        opts = ConvertOptions(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        name = str(first["loc"][0])
        what = name.upper() if name in ("src", "dest") else f"--{name.replace('_', '-')}:"  # arguments, options
        raise fail(f"{what} {message}", 2) from None
    summary = guarded(lambda: run_convert(opts))
    console.print(f"{public_url(dest)}: {summary.format} store, version {summary.version}")
    table = Table(show_header=False)
    for name, value in (("added", summary.added), ("rejected", summary.rejected),
                        ("unchanged", summary.unchanged), ("shards written", len(summary.shards_written)),
                        *((f"split {s}", with_boxes(n, summary.boxes.get(s))) for s, n in summary.splits.items())):
        table.add_row(name, str(value))
    console.print(table)
    if summary.rejected:
        console.print(f"rejects listed in {public_url(dest)}/rejects.jsonl")
    kept = summary.kept_changes()
    if kept:
        console.print(kept, markup=False, highlight=False, soft_wrap=True)


def with_boxes(samples: int, boxes: int | None) -> str:
    """A split's sample count, and for a yolo store its boxes (where recorded)."""
    return str(samples) if boxes is None else f"{samples} ({boxes} boxes)"


@app.command()
def inspect(
    dest: str = typer.Argument(..., help="a shard store: local path or fsspec URL"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Show a store's format, version, classes, splits and rejects."""
    info = guarded(lambda: inspect_store(dest))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{public_url(dest)}: {info['format']} store, version {info['version']}, layout {info['layout']}")
    table = Table()
    for col in ("split", "samples", "shards", "bytes", "classes/shard min-median-max"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in info["splits"].items():
        mix = s["classes_per_shard"]
        mixing = f"{mix['min']}-{mix['median']:g}-{mix['max']}" if mix else "-"
        table.add_row(name, with_boxes(s["samples"], s.get("boxes")), str(s["shards"]), f"{s['bytes']:,}", mixing)
    shown = ", ".join(info["classes"][:20]) + (", ..." if len(info["classes"]) > 20 else "")
    typer.echo(f"classes ({len(info['classes'])}): {shown}")
    order = info["order"]
    typer.echo("sample order: " + (
        "listing (class by class as the source was listed)" if order["rule"] == "listing"
        else f"key-hash, seed {order['seed']} (from store version {order['since_version']})"))
    if info["holdout"]:
        h = info["holdout"]
        typer.echo(f"holdout: {h['fraction']:.1%} of the inputs in {h['split']} ({h['rule']})")
    typer.echo(f"rejects: {info['rejects']} " + json.dumps(info["rejects_by_reason"]))
    if info["splits"]:
        stdout.print(table)
    else:
        typer.echo("splits: none, no sample stored (every input was rejected)")


@app.command()
def verify(
    dest: str = typer.Argument(..., help="a shard store: local path or fsspec URL"),
    deep: bool = typer.Option(False, "--deep", help="also decode every image"),
) -> None:
    """Check every shard's sha256, size and sample count against the manifest (exit 1 on a mismatch)."""
    problems = guarded(lambda: run_verify(dest, deep=deep, progress=True))
    for p in problems:
        console.print(f"error: {p}", markup=False, highlight=False, soft_wrap=True)
    if problems:
        console.print(RECOVER, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    typer.echo(f"ok: every shard matches {public_url(dest)}/manifest.json")
