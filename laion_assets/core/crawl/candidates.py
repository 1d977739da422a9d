"""Candidate (image URL, alt text) pairs from WAT records, with language, by LAION-5B's rules.

Rules, in the order they apply to each `IMG@/src` link of a `response` record's HTML metadata:
1. an alt text must be present;
2. the URL is resolved against the page URL and `Head.Base` (relative and protocol-relative URLs are
   kept, unlike LAION-5B's first pass); only http(s) survives (`data:`, `javascript:`, `mailto:`, ... are
   dropped), and so do not `.svg` / `.gif` images;
3. the URL is normalized (fragment dropped, scheme and host lower-cased, default port removed) so that
   exact dedup later compares like with like;
4. the alt text is repaired (ftfy), stripped of unprintable characters and U+FFFD, whitespace-collapsed,
   truncated when absurdly long, and dropped when shorter than 5 characters;
5. CLD3 names its language: a code when reliable, `""` (nolang) otherwise, with the probability.
Every drop is counted by rule; nothing is dropped silently.

Each pair also keeps its page's robots directives (`robots`), for the download to honour a page's AI opt-out:
the page's X-Robots-Tag header (lower-cased, repeated headers comma-joined), then `; meta NAME: CONTENT` for each
`<meta name=NAME>` of `Head.Metas` whose name is one of `ExtractSettings.robots_meta_names` (robots, CCBot, our
token), e.g. `noarchive; meta robots: noai, noindex`; "" when the page said nothing.
"""

from __future__ import annotations

from enum import Enum
from typing import Any
from urllib.parse import urljoin

import ftfy
import pyarrow as pa

from laion_assets.core.settings import ExtractSettings

SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("text", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("page_url", pa.string()),
        ("robots", pa.string()),
        ("crawl", pa.string()),
        ("wat_file", pa.string()),
        ("record_offset", pa.int64()),
        ("record_id", pa.string()),
        ("link_index", pa.int32()),
    ]
)
COLUMNS = SCHEMA.names


class Drop(Enum):
    """Why a link with an alt text is not a pair (returned instead of a URL); the value names its counter."""

    SCHEME = "dropped_scheme"
    EXTENSION = "dropped_extension"
    INVALID_URL = "dropped_invalid_url"


def first(value: Any) -> Any:
    """A header value: since CC-MAIN-2024-51 repeated headers are JSON lists instead of strings."""
    if type(value) is list:
        return value[0] if value else None
    return value


def joined(value: Any) -> str:
    """All values of a possibly repeated header, comma-joined as HTTP would fold them."""
    if value is None:
        return ""
    if type(value) is list:
        return ", ".join(str(v) for v in value)
    return str(value)


def robots_directives(x_robots_tag: str, metas: Any, names: frozenset[str]) -> str:
    """The page's robots record: its X-Robots-Tag, then its robots `<meta>` tags for `names` (WAT `Head.Metas`, a
    list of {"name": ..., "content": ...}; anything else there is ignored)."""
    parts = [x_robots_tag] if x_robots_tag else []
    if type(metas) is list:
        for meta in metas:
            if type(meta) is not dict:
                continue
            name, content = meta.get("name"), meta.get("content")
            if type(name) is str and type(content) is str and name.strip().lower() in names and content.strip():
                parts.append(f"meta {name.strip().lower()}: {' '.join(content.lower().replace(';', ',').split())}")
    return "; ".join(parts)


def normalize_url(url: str, drop_extensions: tuple[str, ...] = ExtractSettings.drop_extensions) -> str | Drop:
    """Canonical form of an absolute http(s) URL, or a drop reason.

    Done with string operations rather than urlsplit: this runs on every kept link of a crawl.
    """
    url = url.partition("#")[0]
    if not url.isprintable() or " " in url:
        # Browsers drop tabs and newlines inside URLs and percent-encode spaces.
        url = "".join(c for c in url if c.isprintable()).replace(" ", "%20")
    scheme, sep, rest = url.partition("://")
    if not sep:  # "mailto:x" has a scheme of its own; anything else is not a URL
        return Drop.SCHEME if ":" in url.partition("/")[0] else Drop.INVALID_URL
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        return Drop.SCHEME
    end = len(rest)
    for ch in "/?":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not host or host.startswith(":") or "\\" in host or host.startswith("[") and "]" not in host:
        return Drop.INVALID_URL
    if not host.islower():
        host = host.lower()
    if host.endswith(":80") and scheme == "http" or host.endswith(":443") and scheme == "https":
        host = host.rpartition(":")[0]
    if not tail:
        tail = "/"
    elif tail[0] == "?":
        tail = "/" + tail
    path = tail.partition("?")[0].lower()
    if path.endswith(drop_extensions):
        return Drop.EXTENSION
    return f"{scheme}://{userinfo}{at}{host}{tail}"


def resolve_url(
    raw: str, base: str, base_scheme: str, drop_extensions: tuple[str, ...] = ExtractSettings.drop_extensions
) -> str | Drop:
    """An `IMG@/src` value made absolute against the page's base URL and normalized, or a drop reason."""
    raw = raw.strip()
    if not raw:
        return Drop.INVALID_URL
    head = raw[:11].lower()
    if head.startswith(("http://", "https://")):
        absolute = raw
    elif head.startswith(("data:", "javascript:")):
        return Drop.SCHEME
    elif raw.startswith("//"):
        absolute = base_scheme + ":" + raw
    else:
        try:
            absolute = urljoin(base, raw)
        except ValueError:  # e.g. an invalid IPv6 literal
            return Drop.INVALID_URL
    return normalize_url(absolute, drop_extensions)


def clean_text(raw: str, max_length: int) -> tuple[str, bool]:
    """Repaired, printable, whitespace-collapsed alt text, and whether it was truncated."""
    text = raw
    if not text.isascii() or "&" in text:
        # ftfy repairs mojibake and HTML entities; pure ASCII without '&' has neither, and ftfy is slow.
        text = ftfy.fix_text(text)
    if "\ufffd" in text:  # an undecodable byte carries no information
        text = text.replace("\ufffd", " ")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    if len(text) > max_length:
        return text[:max_length].rstrip(), True
    return text, False
