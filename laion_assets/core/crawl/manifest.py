"""A crawl's WAT listing split into deterministic, contiguous chunks: the parse stage's partitions."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from laion_assets.core.crawl.source import read_listing
from laion_assets.core.paths import Layout
from laion_assets.core.settings import SourceSettings


def chunk_slices(n_paths: int, n_chunks: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of a listing, as even as possible; deterministic for a listing."""
    if n_chunks < 1:
        raise ValueError("n_chunks must be at least 1")
    return [(i * n_paths // n_chunks, (i + 1) * n_paths // n_chunks) for i in range(n_chunks)]


def build_manifest(wat_paths: list[str], layout: Layout) -> pa.Table:
    """A table (chunk, position, path): position is the path's index in the crawl's listing."""
    chunks: list[str] = []
    for chunk, (lo, hi) in enumerate(chunk_slices(len(wat_paths), layout.chunks)):
        chunks.extend([layout.chunk_key(chunk)] * (hi - lo))
    return pa.table({"chunk": chunks, "position": pa.array(range(len(wat_paths)), pa.int64()), "path": wat_paths})


def chunk_paths(manifest: pa.Table, chunk: str) -> list[str]:
    """The WAT paths of one chunk, in listing order."""
    return [p for c, p in zip(manifest["chunk"].to_pylist(), manifest["path"].to_pylist(), strict=True) if c == chunk]


def run(crawl: str, source: SourceSettings, layout: Layout, s3_client: Any = None) -> pa.Table:
    """The WAT manifest's entry point: the crawl's `wat.paths.gz` from the source, split into the layout's chunks."""
    return build_manifest(read_listing(crawl, source, s3_client), layout)
