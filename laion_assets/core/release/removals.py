"""Removal lists: samples that must never be released again (Re-LAION-5B's lesson), kept in storage as append-only
versions, and matched against any table of samples.

Storage: `removals/v000001.jsonl`, `v000002.jsonl`, ... Each version file holds the entries added in that version,
one JSON object a line; version N is every entry of versions 1..N. A version is written once, atomically, and never
edited; the latest version's name (`v000002`) is the removal list's data version in Dagster.

An entry names one of:
- `url`: an exact URL;
- `domain`: a host and all its subdomains (`example.com` matches `img.example.com`), or, when the value has a
  scheme (`https://example.com/users/42/`), every URL starting with that prefix;
- `sha256`: the SHA-256 of the image bytes (the download's `sha256`);
- `md5`: the MD5 of the URL (as hash lists of URLs are shared, without republishing the URLs themselves);
- `phash`: a 64-bit pHash (16 hex digits) with a Hamming `radius`: every image whose pHash is that close;
plus a `reason` and the `date` it was added.

The API other stages use (the kNN index too):

    removal_list = load(store)                 # the latest version (load(store, 3): version 3)
    reasons = removal_list.match(table)        # pyarrow table with URL / sha256 / phash columns (names settable)
    # -> pyarrow table: removed (bool), reason (string or null), rule (e.g. "domain:example.com")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from laion_assets.core import paths
from laion_assets.core.storage import Storage

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

KINDS = ("url", "domain", "sha256", "md5", "phash")
NO_VERSION = "none"
_VERSION_FILE = re.compile(r"^v(\d{6})\.jsonl$")
_HEX = {"sha256": 64, "md5": 32, "phash": 16}
MAX_RADIUS = 16


class RemovalEntryError(ValueError):
    """A malformed removal entry; nothing is written."""


@dataclass(frozen=True)
class RemovalEntry:
    kind: str
    value: str
    reason: str
    date: str
    radius: int | None = None

    @property
    def rule(self) -> str:
        return f"{self.kind}:{self.value}" + (f"~{self.radius}" if self.kind == "phash" else "")


def make_entry(kind: str, value: str, reason: str, radius: int | None = None, date: str | None = None
               ) -> RemovalEntry:
    """A validated entry (hex digests lowercased, domains lowercased); RemovalEntryError says what is wrong."""
    value = value.strip()
    if kind not in KINDS:
        raise RemovalEntryError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if not reason.strip():
        raise RemovalEntryError("a removal needs a reason")
    if not value:
        raise RemovalEntryError(f"empty {kind}")
    if kind in _HEX:
        value = value.lower()
        if len(value) != _HEX[kind] or not re.fullmatch(r"[0-9a-f]+", value):
            raise RemovalEntryError(f"{kind} must be {_HEX[kind]} hex digits, not {value!r}")
    if kind == "phash":
        if radius is None or not 0 <= radius <= MAX_RADIUS:
            raise RemovalEntryError(f"a phash needs a radius between 0 and {MAX_RADIUS}, not {radius!r}")
    elif radius is not None:
        raise RemovalEntryError(f"only a phash takes a radius ({kind} given {radius})")
    if kind == "url" and "://" not in value:
        raise RemovalEntryError(f"a url needs a scheme (http://...), not {value!r}")
    if kind == "domain":
        value = value if "://" in value else value.lower().strip(".")
        if "://" not in value and ("/" in value or " " in value):
            raise RemovalEntryError(f"a domain is a host name (or a URL prefix with its scheme), not {value!r}")
    return RemovalEntry(kind, value, reason.strip(), date or dt.date.today().isoformat(), radius)


def parse_lines(lines: Iterable[str], reason: str, source: str = "list") -> list[RemovalEntry]:
    """Entries from a list file: `KIND VALUE [RADIUS]` a line (`phash <hex> <radius>`); blank lines and lines
    starting with # are skipped. A malformed line is refused with its number."""
    entries = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        try:
            if len(fields) not in (2, 3):
                raise RemovalEntryError("expected KIND VALUE [RADIUS]")
            radius = None
            if len(fields) == 3:
                if not fields[2].isdigit():
                    raise RemovalEntryError(f"radius must be a whole number, not {fields[2]!r}")
                radius = int(fields[2])
            entries.append(make_entry(fields[0], fields[1], reason, radius))
        except RemovalEntryError as err:
            raise RemovalEntryError(f"{source}, line {number}: {err}: {text!r}") from None
    return entries


@dataclass(frozen=True)
class RemovalList:
    version: str  # "v000003", or NO_VERSION
    entries: tuple[RemovalEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> dict[str, int]:
        return {k: sum(e.kind == k for e in self.entries) for k in KINDS}

    def reasons(self, frame: pl.DataFrame, url: str = "url", sha256: str = "sha256", phash: str = "phash"
                ) -> pl.Series:
        """For each row of a polars frame, the reason of the first entry that matches it (null: not removed)."""
        return self._match(frame, url, sha256, phash)["reason"]

    def match(self, table: pa.Table, url: str = "URL", sha256: str = "sha256", phash: str = "phash") -> pa.Table:
        """For each row of a pyarrow table: removed, reason, rule (the entry that matched). Columns that the table
        lacks match nothing."""
        import polars as pl

        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        out = self._match(frame, url, sha256, phash)
        return out.select(pl.col("reason").is_not_null().alias("removed"), "reason", "rule").to_arrow()

    def _match(self, frame: pl.DataFrame, url: str, sha256: str, phash: str) -> pl.DataFrame:
        import polars as pl

        n = frame.height
        empty = pl.Series([None] * n, dtype=pl.String)
        urls = frame[url].cast(pl.String) if url in frame.columns else empty
        shas = frame[sha256].cast(pl.String).str.to_lowercase() if sha256 in frame.columns else empty
        hashes = frame[phash].cast(pl.String) if phash in frame.columns else empty
        rule = pl.Series([None] * n, dtype=pl.String)
        by_rule = {e.rule: e.reason for e in self.entries}
        for kind in KINDS:
            entries = [e for e in self.entries if e.kind == kind]
            if not entries:
                continue
            if kind == "url":
                hit = _lookup(urls, {e.value: e.rule for e in entries})
            elif kind == "sha256":
                hit = _lookup(shas, {e.value: e.rule for e in entries})
            elif kind == "md5":
                wanted = {e.value: e.rule for e in entries}
                unique = urls.drop_nulls().unique().to_list()
                digests = {u: wanted.get(hashlib.md5(u.encode()).hexdigest()) for u in unique}
                hit = urls.replace_strict(digests, default=None, return_dtype=pl.String)
            elif kind == "domain":
                hit = _domains(urls, entries)
            else:
                hit = _phashes(hashes, entries)
            rule = rule.fill_null(hit)
        reason = rule.replace_strict(by_rule, default=None, return_dtype=pl.String)
        return pl.DataFrame({"reason": reason, "rule": rule})


def _lookup(values: pl.Series, wanted: dict[str, str]) -> pl.Series:
    import polars as pl

    return values.replace_strict(wanted, default=None, return_dtype=pl.String)


def _domains(urls: pl.Series, entries: list[RemovalEntry]) -> pl.Series:
    """The rule of the first domain entry whose host (or a parent of it) or URL prefix matches each URL."""
    import polars as pl

    hosts = {e.value: e.rule for e in entries if "://" not in e.value}
    prefixes = [(e.value, e.rule) for e in entries if "://" in e.value]
    out = {}
    for u in urls.drop_nulls().unique().to_list():
        host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", u.lower()).split("/", 1)[0].split("?", 1)[0]
        host = host.rsplit("@", 1)[-1].split(":", 1)[0]
        labels = host.split(".")
        found = next((hosts[".".join(labels[i:])] for i in range(len(labels)) if ".".join(labels[i:]) in hosts), None)
        if found is None:
            found = next((r for p, r in prefixes if u.startswith(p)), None)
        if found is not None:
            out[u] = found
    return urls.replace_strict(out, default=None, return_dtype=pl.String)


def _phashes(hashes: pl.Series, entries: list[RemovalEntry]) -> pl.Series:
    """The rule of the first pHash entry within its radius of each row's pHash (multi-index keys, as dedup)."""
    import polars as pl

    from laion_assets.core.release.dedup import key_masks

    rows = pl.DataFrame({"h": hashes.str.to_integer(base=16, dtype=pl.UInt64, strict=False)}).with_row_index("row")
    rows = rows.filter(pl.col("h").is_not_null())
    found = []
    for radius in sorted({e.radius or 0 for e in entries}):
        ents = pl.DataFrame({"e": [int(e.value, 16) for e in entries if e.radius == radius],
                             "rule": [e.rule for e in entries if e.radius == radius]},
                            schema={"e": pl.UInt64, "rule": pl.String})
        for mask in key_masks(radius):
            m = pl.lit(mask, dtype=pl.UInt64)
            pairs = (rows.with_columns((pl.col("h") & m).alias("k"))
                     .join(ents.with_columns((pl.col("e") & m).alias("k")), on="k")
                     .filter((pl.col("h") ^ pl.col("e")).bitwise_count_ones() <= radius)
                     .select("row", "rule"))
            found.append(pairs)
    index = pl.DataFrame({"row": pl.int_range(hashes.len(), dtype=pl.UInt32, eager=True)})
    if not found:
        return pl.Series([None] * hashes.len(), dtype=pl.String)
    first = pl.concat(found).sort("row", "rule").unique("row", keep="first")
    return index.join(first.with_columns(pl.col("row").cast(pl.UInt32)), on="row", how="left").sort("row")["rule"]


# --- storage ---------------------------------------------------------------------------------------------------

def versions(store: Storage) -> list[int]:
    """The stored version numbers, ascending."""
    out = []
    for key in store.list(paths.removals()):
        match = _VERSION_FILE.match(key.rsplit("/", 1)[-1])
        if match:
            out.append(int(match.group(1)))
    return sorted(out)


def version_name(number: int) -> str:
    return f"v{number:06d}" if number else NO_VERSION


def current_version(store: Storage) -> str:
    found = versions(store)
    return version_name(found[-1]) if found else NO_VERSION


def _read_version(store: Storage, number: int) -> list[RemovalEntry]:
    return [RemovalEntry(**json.loads(line)) for line in store.read_bytes(paths.removal_version(number)).splitlines()
            if line.strip()]


def added_in(store: Storage, version: int | None = None) -> RemovalList:
    """The entries one version added (default: the latest; an empty list when there is none), named by it."""
    found = versions(store)
    if version is not None and version not in found:
        raise KeyError(f"no removal list version {version} in {store.uri(paths.removals())} (have {found})")
    number = version if version is not None else (found[-1] if found else 0)
    return RemovalList(version_name(number), tuple(_read_version(store, number)) if number else ())


def load(store: Storage, version: int | None = None) -> RemovalList:
    """The removal list at a version (default: the latest; an empty list when there is none)."""
    found = versions(store)
    if version is not None and version not in found:
        raise KeyError(f"no removal list version {version} in {store.uri(paths.removals())} (have {found})")
    upto = found[-1] if version is None and found else (version or 0)
    entries: list[RemovalEntry] = []
    for number in found:
        if number <= upto:
            entries += _read_version(store, number)
    return RemovalList(version_name(upto), tuple(entries))


def add(store: Storage, entries: list[RemovalEntry]) -> str:
    """Write the next version with these entries; returns its name. Nothing is written for an empty list."""
    if not entries:
        raise RemovalEntryError("no entries to add")
    number = (versions(store) or [0])[-1] + 1
    key = paths.removal_version(number)
    if store.exists(key):  # another writer got there first: never overwrite a version
        raise RemovalEntryError(f"{store.uri(key)} appeared while writing; run again")
    store.write_bytes(key, b"".join(json.dumps(asdict(e), sort_keys=True).encode() + b"\n" for e in entries))
    return version_name(number)


def summary(store: Storage) -> list[dict[str, Any]]:
    """Each version with the entries it added per kind, and its date."""
    out = []
    for number in versions(store):
        added = _read_version(store, number)
        out.append({"version": version_name(number), "entries": len(added),
                    **{k: sum(e.kind == k for e in added) for k in KINDS},
                    "dates": sorted({e.date for e in added})})
    return out
