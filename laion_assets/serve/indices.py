"""Which indices the service offers: one per crawl with a complete `crawls/<crawl>/knn_index`, plus `all` (the
merged index) when built. One that cannot be opened is listed as unavailable with the reason; the rest serve.

Removals newer than an index: at startup the storage root's latest removal list is matched against every index's
rows (URL, sha256, pHash), and the matching rows are filtered out of every result (with the folder's own
`removed_ids.parquet`) until the knn_index asset rebuilds the index without them. A removal added while the
service runs takes effect at its next start (or with the rebuild, which the REPROCESS automation launches)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from laion_assets.core import paths
from laion_assets.core.index.crawl import removed_since_build
from laion_assets.core.index.search import IndexUnavailable, OpenIndex, open_index
from laion_assets.core.release import removals
from laion_assets.core.storage import Storage


def index_folders(root: str) -> dict[str, str]:
    """{indice name: folder} of every index folder under a local storage root (complete or not)."""
    found: dict[str, str] = {}
    crawls = os.path.join(root, paths.knn_indices_root())
    if os.path.isdir(crawls):
        for crawl in sorted(os.listdir(crawls)):
            folder = os.path.join(root, paths.knn_index(crawl))
            if os.path.isdir(folder):
                found[crawl] = folder
    merged = os.path.join(root, paths.knn_index_all())
    if os.path.isdir(merged):
        found[paths.ALL_INDICES] = merged
    return found


@dataclass
class Indices:
    available: dict[str, OpenIndex] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def status(self) -> dict[str, dict]:
        doc: dict[str, dict] = {}
        for name, ix in self.available.items():
            doc[name] = {"available": True, "rows": ix.metadata.num_rows, "dim": ix.dim,
                         "removed_since_build": len(ix.removed),
                         "image_index_key": ix.report.get("image", {}).get("index_key", "")}
        for name, reason in self.unavailable.items():
            doc[name] = {"available": False, "reason": reason}
        return dict(sorted(doc.items()))


def load_indices(root: str) -> Indices:
    indices = Indices()
    removal_list = removals.load(Storage(root))
    for name, folder in index_folders(root).items():
        try:
            index = open_index(name, folder)
        except IndexUnavailable as err:
            indices.unavailable[name] = str(err)
            continue
        index.removed = index.removed | removed_since_build(folder, removal_list)
        indices.available[name] = index
    return indices
