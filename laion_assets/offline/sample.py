"""The built-in sample crawl: a local Common Crawl mirror that makes the whole graph run offline.

It holds `crawl-data/<crawl>/wat.paths.gz` and a few WAT files in the real format (one gzip member per
record, CRLF headers, ia-web-commons JSON), whose pages link images that a local HTTP server serves
from `<mirror>/www/`. The pages exercise every extraction rule: relative, protocol-relative and
`Head.Base` URLs, `data:`/`javascript:` sources, `.svg`/`.gif` images, missing and too-short alt texts,
HTML entities and mojibake, list-form repeated headers, URLs repeated across pages and files, and
image URLs that will 404, that `www/robots.txt` disallows, or whose JPEG is truncated; every 9th image
carries a text watermark.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from laion_assets.core import paths
from laion_assets.core.records import JsonRecord
from laion_assets.core.settings import SampleSettings
from laion_assets.core.storage import atomic_path
from laion_assets.offline.synthetic import LANGUAGES, jpeg_bytes, random_scene, render


@dataclass
class SampleReport(JsonRecord):
    mirror: str
    crawl: str
    wat_files: list[str] = field(default_factory=list)
    pages: int = 0
    images: int = 0
    image_links: int = 0


def _warc_member(headers: list[tuple[str, str]], payload: bytes) -> bytes:
    head = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return gzip.compress(head.encode() + payload + b"\r\n\r\n", compresslevel=6, mtime=0)


def _record_id(rng: random.Random) -> str:
    return f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"


def _envelope(warc_headers: dict, payload_meta: dict, filename: str, offset: int) -> dict:
    return {
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Length": "600",
            "Block-Digest": "sha1:" + hashlib.sha1(orjson.dumps(warc_headers)).hexdigest().upper()[:32],
            "Actual-Content-Length": warc_headers.get("Content-Length", "0"),
            "WARC-Header-Metadata": warc_headers,
            "Payload-Metadata": payload_meta,
        },
        "Container": {"Compressed": True, "Offset": str(offset), "Filename": filename},
    }


class _Page:
    """One HTML page's links: the images it shows and the decoys every rule must catch."""

    def __init__(self, rng: random.Random, base: str, url: str, images: list[tuple[str, str]], logo: str) -> None:
        self.links: list[dict] = []
        self.head: dict = {"Title": "Sample page", "Metas": [{"name": "viewport", "content": "width=device-width"}]}
        use_base = rng.random() < 0.25
        if use_base:
            self.head["Base"] = base + "img/"
        host = base.split("://", 1)[1].rstrip("/")
        for name, alt in images:
            form = rng.random()
            if use_base:
                src = name  # relative to Head.Base
            elif form < 0.45:
                src = f"{base}img/{name}"
            elif form < 0.7:
                src = f"../img/{name}"
            elif form < 0.85:
                src = f"//{host}/img/{name}"
            else:
                src = f"{base}img/{name}#zoom"
            self.links.append({"path": "IMG@/src", "url": src, "alt": alt})
        self.links.append({"path": "IMG@/src", "url": f"{base}img/{logo}", "alt": "Sample Photo Gallery logo"})
        decoys = [
            {"path": "IMG@/src", "url": "data:image/png;base64,iVBORw0KGgo=", "alt": "inline pixel image"},
            {"path": "IMG@/src", "url": f"{base}img/icon.svg", "alt": "vector icon of a house"},
            {"path": "IMG@/src", "url": f"{base}img/spinner.gif", "alt": "loading animation"},
            {"path": "IMG@/src", "url": f"{base}img/spacer.jpg", "alt": "img"},
            {"path": "IMG@/src", "url": f"{base}img/noalt.jpg"},
            {"path": "IMG@/src", "url": "javascript:void(0)", "alt": "click to open the gallery"},
            {"path": "A@/href", "url": f"{base}pages/index.html", "text": "Home"},
            {"path": "A@/href", "url": "https://example.org/about", "text": "About"},
        ]
        self.links.extend(rng.sample(decoys, 4))
        rng.shuffle(self.links)


_Pool = list[tuple[str, dict[str, str]]]  # (image file name, caption per language)


def _image_pool(rng: random.Random, settings: SampleSettings, www: Path, report: SampleReport) -> _Pool:
    """The images the pages show; each appears on one or two pages, so some URLs repeat across WAT files. Some
    are linked but never served (404), disallowed by robots.txt, or truncated; every 9th carries a watermark."""
    n_slots = settings.wat_files * settings.pages_per_file * settings.images_per_page
    pool: _Pool = []
    for i in range(int(n_slots * 0.75)):
        scene = random_scene(rng)
        name = f"{i:05d}.jpg"
        size = (rng.randint(320, 640), rng.randint(240, 480))
        if rng.random() < 0.04:
            name = f"missing-{i:05d}.jpg"  # linked but never served: a 404 for the downloader
        else:
            mark = "(c) stock" if i % 9 == 4 else None
            data = jpeg_bytes(render(scene, size, seed=settings.seed * 100_003 + i, watermark=mark))
            if i % 29 == 5:
                name = f"private/{i:05d}.jpg"  # served, but robots.txt disallows it: skipped_by_policy
            elif i % 37 == 11:
                data = data[: len(data) // 2]  # a truncated JPEG: failed_to_resize
            (www / name).parent.mkdir(parents=True, exist_ok=True)
            (www / name).write_bytes(data)
            report.images += 1
        pool.append((name, {lang: scene.caption(lang) for lang in LANGUAGES}))
    return pool


def _alt_text(rng: random.Random, captions: dict[str, str]) -> str:
    """An alt text as pages write them: mostly a caption, sometimes with entities, mojibake or a file name."""
    roll = rng.random()
    if roll < 0.55:
        return captions["en"]
    if roll < 0.85:
        return captions[rng.choice(LANGUAGES[1:])]
    if roll < 0.9:
        return captions["en"].replace(" on ", " &amp; on ") + "  \n "
    if roll < 0.95:
        return captions["fr"].encode("utf-8").decode("latin-1")  # mojibake for ftfy
    return f"IMG_{rng.randint(1000, 9999)}.JPG"


def _http_headers(p: int) -> dict:
    headers: dict = {"Content-Type": "text/html; charset=UTF-8", "Server": "sample"}
    if p % 10 == 3:
        headers["X-Robots-Tag"] = "noai"
    if p % 10 == 7:  # the list form of repeated headers (CC-MAIN-2024-51 onwards)
        headers["Set-Cookie"] = ["a=1; Path=/", "b=2; Path=/"]
        headers["X-Robots-Tag"] = ["noimageai", "noarchive"]
    return headers


def _record_meta(kind: str, page: _Page, page_url: str, base: str, p: int, rng: random.Random) -> dict:
    """The Payload-Metadata of a page's request, response or metadata WAT record."""
    if kind == "request":
        return {"Actual-Content-Type": "application/http; msgtype=request",
                "HTTP-Request-Metadata": {"Request-Message": {"Method": "GET", "Path": page_url, "Version": "HTTP/1.1"},
                                          "Headers": {"Host": base.split("/")[2], "User-Agent": "CCBot/2.0"}}}
    if kind == "response":
        return {"Actual-Content-Type": "application/http; msgtype=response",
                "HTTP-Response-Metadata": {
                    "Response-Message": {"Status": "200", "Version": "HTTP/1.1", "Reason": "OK"},
                    "Headers": _http_headers(p), "HTML-Metadata": {"Head": page.head, "Links": page.links}}}
    fetch_time = {"Name": "fetchTimeMs", "Value": str(rng.randint(50, 900))}
    return {"Actual-Content-Type": "application/warc-fields",
            "WARC-Metadata-Metadata": {"Metadata-Records": [fetch_time]}}


def _page_members(out: bytearray, rng: random.Random, page: _Page, page_url: str, base: str, p: int, when: str,
                  warc_name: str) -> None:
    """The request, response and metadata WAT records of one page, appended to out."""
    response_id = _record_id(rng)
    for kind in ("request", "response", "metadata"):
        warc_headers = {
            "WARC-Type": kind,
            "WARC-Date": when,
            "WARC-Record-ID": response_id if kind == "response" else _record_id(rng),
            "WARC-Target-URI": page_url,
            "Content-Length": "2048",
            "Content-Type": {"request": "application/http; msgtype=request",
                             "response": "application/http; msgtype=response",
                             "metadata": "application/warc-fields"}[kind],
        }
        body = orjson.dumps(_envelope(warc_headers, _record_meta(kind, page, page_url, base, p, rng), warc_name,
                                      len(out)))
        out += _warc_member(
            [("WARC-Type", "metadata"), ("WARC-Target-URI", page_url), ("WARC-Date", when),
             ("WARC-Record-ID", _record_id(rng)), ("WARC-Refers-To", warc_headers["WARC-Record-ID"]),
             ("Content-Type", "application/json")],
            body,
        )


def _wat_file(f: int, settings: SampleSettings, rng: random.Random, pool: _Pool, slots: list[int], base: str,
              report: SampleReport) -> tuple[str, bytes]:
    """One WAT file of the sample crawl: (its path relative to the mirror, its bytes)."""
    start = datetime(2099, 1, 1, tzinfo=UTC)
    rel = (f"crawl-data/{settings.crawl}/segments/1700000000000.{f:02d}/wat/"
           f"{settings.crawl}-20990101000000-{f:05d}-sample.warc.wat.gz")
    warc_name = os.path.basename(rel).replace(".warc.wat.gz", ".warc.gz")
    out = bytearray()
    info = f"Software-Info: laion-assets sample crawl\r\nExtracted-Date: {start:%a, %d %b %Y %H:%M:%S GMT}\r\n"
    out += _warc_member(
        [("WARC-Type", "warcinfo"), ("WARC-Date", f"{start:%Y-%m-%dT%H:%M:%SZ}"), ("WARC-Filename", warc_name),
         ("WARC-Record-ID", _record_id(rng)), ("Content-Type", "application/warc-fields")],
        info.encode(),
    )
    for p in range(settings.pages_per_file):
        when = (start + timedelta(minutes=f * 1000 + p)).strftime("%Y-%m-%dT%H:%M:%SZ")
        page_url = f"{base}pages/{f:02d}-{p:03d}.html"
        first = (f * settings.pages_per_file + p) * settings.images_per_page
        images = []
        for slot in slots[first:first + settings.images_per_page]:
            name, captions = pool[slot]
            images.append((name, _alt_text(rng, captions)))
        page = _Page(rng, base, page_url, images, "logo.jpg")
        report.pages += 1
        report.image_links += sum(1 for link in page.links if link["path"] == "IMG@/src")
        _page_members(out, rng, page, page_url, base, p, when, warc_name)
    return rel, bytes(out)


def build_sample_crawl(mirror: str | os.PathLike, settings: SampleSettings | None = None) -> SampleReport:
    """Write the sample crawl's listing, WAT files and images under mirror (deterministic for a seed)."""
    settings = settings or SampleSettings()
    rng = random.Random(settings.seed)
    base = settings.image_base_url.rstrip("/") + "/"
    root = Path(mirror)
    www = root / "www" / "img"
    www.mkdir(parents=True, exist_ok=True)
    report = SampleReport(mirror=str(root.absolute()), crawl=settings.crawl)
    pool = _image_pool(rng, settings, www, report)
    (root / "www" / "robots.txt").write_text("User-agent: *\nDisallow: /img/private/\n")
    (www / "logo.jpg").write_bytes(jpeg_bytes(render(random_scene(rng), (400, 300), seed=7)))
    report.images += 1
    n_slots = settings.wat_files * settings.pages_per_file * settings.images_per_page
    slots = [i % len(pool) for i in range(n_slots)]
    rng.shuffle(slots)
    listing = []
    for f in range(settings.wat_files):
        rel, data = _wat_file(f, settings, rng, pool, slots, base, report)
        with atomic_path(root / rel) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
        listing.append(rel)
    report.wat_files = listing
    # Last, and atomically: the listing is what makes the crawl exist for list_crawls and the new_crawls sensor.
    with atomic_path(root / paths.wat_listing(settings.crawl)) as tmp, open(tmp, "wb") as fh:
        fh.write(gzip.compress(("\n".join(listing) + "\n").encode(), mtime=0))
    return report
