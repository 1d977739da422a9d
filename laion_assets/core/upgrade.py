"""Bringing a storage root written before the IO manager's keys came from the asset key and partition alone (issue
16) up to date, without redoing any work: the records the IO manager used to keep at stage-specific keys get their
new keys (a pointer to a record the stage committed, a copy of one the IO manager wrote). Tables kept their keys.

The old keys are spelled out here, once, as what they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from laion_assets.core import paths
from laion_assets.core.paths import Layout
from laion_assets.core.records import POINTER
from laion_assets.core.storage import Storage


@dataclass
class UpgradeReport:
    pointers: int = 0
    copies: int = 0
    already: int = 0
    crawls: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.crawls)} crawls: {self.pointers} pointers and {self.copies} records written, "
                f"{self.already} already in place")


def _write(store: Storage, key: str, data: bytes, report: UpgradeReport, pointer: bool) -> None:
    if store.exists(key):
        report.already += 1
        return
    store.write_bytes(key, data)
    if pointer:
        report.pointers += 1
    else:
        report.copies += 1


def _moves(crawl: str, layout: Layout) -> list[tuple[str, str, dict[str, str], bool]]:
    """(old key, asset, partition dims, whether the old record is the stage's committed one) of a crawl."""
    moves = [(paths.candidates_marker(crawl, c, layout), "candidate_pairs", {"chunk": c}, True)
             for c in layout.chunk_keys()]
    for b in layout.bucket_keys():
        moves.append((paths.shards_manifest(paths.image_shards(crawl, b, layout)), "image_shards", {"bucket": b}, True))
        moves.append((f"{paths.embeddings(crawl, layout)}/manifests/bucket={b}.json", "image_embeddings",
                      {"bucket": b}, False))
    moves.append((paths.release_manifest(crawl), "release", {}, True))
    moves.append((f"{paths.crawl_root(crawl)}/knn_index_record.json", "knn_index", {}, False))
    return moves


def run(store: Storage, layout: Layout) -> UpgradeReport:
    """Every crawl's old record keys (for this layout's chunk and bucket counts) given their new ones; a no-op on a
    root that is already up to date."""
    report = UpgradeReport(crawls=sorted({k.split("/")[1] for k in store.list("crawls") if k.count("/") >= 2}))
    for crawl in report.crawls:
        for old, asset, dims, committed in _moves(crawl, layout):
            if store.exists(old):
                new = paths.output_key([asset], {"crawl": crawl, **dims}, layout, ".json")
                data = orjson.dumps({POINTER: old}) if committed else store.read_bytes(old)
                _write(store, new, data, report, pointer=committed)
    for old, asset in (("knn_index/all_record.json", "knn_index_all"), ("sample_crawl.json", "sample_crawl")):
        if store.exists(old):
            _write(store, paths.output_key([asset], {}, layout, ".json"), store.read_bytes(old), report, pointer=False)
    return report
