"""A plain, slow reference reading of WAT files, to check the extractor against values it did not produce.

It shares no code with `laion_assets.core.crawl`: records come from warcio (the project reads them with
FastWARC and a lenient reader of its own), JSON from the standard library, URLs are split and rebuilt with
urllib.parse, and each rule is written out as the project's docstring states it. Where the two differ on a
real file, one of them is wrong, and the test names the links.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import ftfy
from warcio.archiveiterator import ArchiveIterator

MIN_TEXT_LENGTH = 5
MAX_TEXT_LENGTH = 1000
DROPPED_ENDINGS = (".svg", ".svgz", ".gif")
DEFAULT_PORTS = {"http": 80, "https": 443}
HTML_SPACE = " \t\n\r\f"  # what HTML strips around an attribute's URL

# The rules, in the order they apply; a link is dropped by the first one it fails.
RULES = ("invalid_url", "scheme", "extension", "short_text")


@dataclass(frozen=True)
class Link:
    """One `IMG@/src` link with a non-empty alt text, as the page gave it."""

    page_url: str
    base: str  # the page URL, or its Head.Base resolved against it
    src: str
    alt: str

    @property
    def plain_url(self) -> str:
        """The README's plain rule: the src resolved against the base, nothing else."""
        return urljoin(self.base, self.src)


@dataclass
class Reading:
    """What the reference saw in one file."""

    records: int = 0  # WARC records other than warcinfo
    response_records: int = 0
    img_links: int = 0
    links: list[Link] = field(default_factory=list)  # those with a non-empty alt
    drops: dict[str, list[Link]] = field(default_factory=lambda: {rule: [] for rule in RULES})
    kept: list[tuple[Link, str, str]] = field(default_factory=list)  # (link, normalized url, cleaned text)

    def plain_pairs(self) -> list[tuple[str, str]]:
        """(url, raw alt) by the README's plain rule.

        Its 1,434 pairs (757 URLs) on the real excerpt count only links that resolve to a web URL: with the 6
        `data:` images it would be 1,440 (759)."""
        return [(link.plain_url, link.alt) for link in self.links if urlsplit(link.plain_url).scheme in DEFAULT_PORTS]

    def pairs(self) -> Counter[tuple[str, str]]:
        """The (url, text) multiset the extractor must produce."""
        return Counter((url, text) for _, url, text in self.kept)


def clean_text(raw: str) -> str:
    """The alt text as a caption: repaired, unprintables and U+FFFD as spaces, whitespace collapsed, truncated."""
    text = ftfy.fix_text(raw)
    text = "".join(" " if c == "\ufffd" or not c.isprintable() else c for c in text)
    text = " ".join(text.split())
    return text[:MAX_TEXT_LENGTH].rstrip()


def normalize(parts: SplitResult) -> str:
    """The canonical form of a split http(s) URL: what exact dedup compares."""
    scheme = parts.scheme.lower()
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host, port = hostport.lower(), parts.port
    if port == DEFAULT_PORTS[scheme]:
        host = host.rpartition(":")[0]
    netloc = f"{userinfo}@{host}" if userinfo else host
    # Browsers drop tabs and newlines inside a URL and percent-encode its spaces.
    path, query = ("".join(c for c in s if c.isprintable()).replace(" ", "%20") for s in (parts.path, parts.query))
    return urlunsplit((scheme, netloc, path or "/", query, ""))


def apply_rules(link: Link) -> tuple[str, str] | str:
    """The (url, text) pair of a link, or the name of the first rule that drops it."""
    src = link.src.strip(HTML_SPACE)
    if not src:  # HTML: an empty src represents no image, it does not point at the page itself
        return "invalid_url"
    try:
        parts = urlsplit(urljoin(link.base, src))
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:  # e.g. "http://[::1/a.jpg"
        return "invalid_url"
    if parts.scheme.lower() not in DEFAULT_PORTS:
        return "scheme"
    if not parts.hostname:
        return "invalid_url"
    if parts.path.lower().endswith(DROPPED_ENDINGS):
        return "extension"
    text = clean_text(link.alt)
    if len(text) < MIN_TEXT_LENGTH:
        return "short_text"
    return normalize(parts), text


def _page_links(envelope: dict[str, Any]) -> list[Link]:
    warc = envelope["WARC-Header-Metadata"]
    html = envelope["Payload-Metadata"]["HTTP-Response-Metadata"].get("HTML-Metadata") or {}
    page_url = warc["WARC-Target-URI"]
    head_base = (html.get("Head") or {}).get("Base")
    base = urljoin(page_url, head_base) if head_base else page_url
    out = []
    for link in html.get("Links") or []:
        if link.get("path") == "IMG@/src" and link.get("alt"):
            out.append(Link(page_url, base, link.get("url", ""), link["alt"]))
    return out


def _img_link_count(envelope: dict[str, Any]) -> int:
    html = envelope["Payload-Metadata"]["HTTP-Response-Metadata"].get("HTML-Metadata") or {}
    return sum(link.get("path") == "IMG@/src" for link in html.get("Links") or [])


@cache
def read(path: Path) -> Reading:
    """The reference reading of one WAT file (cached: several test modules read the same excerpt; do not mutate)."""
    reading = Reading()
    with open(path, "rb") as fh:
        for record in ArchiveIterator(fh):
            if record.rec_type == "warcinfo":
                continue
            reading.records += 1
            if record.rec_type != "metadata":
                continue
            envelope = json.loads(record.content_stream().read())["Envelope"]
            if envelope["WARC-Header-Metadata"].get("WARC-Type") != "response":
                continue
            reading.response_records += 1
            reading.img_links += _img_link_count(envelope)
            reading.links.extend(_page_links(envelope))
    for link in reading.links:
        result = apply_rules(link)
        if isinstance(result, str):
            reading.drops[result].append(link)
        else:
            reading.kept.append((link, *result))
    return reading
