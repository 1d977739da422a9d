"""The extraction rules, each on real Common Crawl records from ../shared/realdata."""

from __future__ import annotations

import gzip
from pathlib import Path
from urllib.parse import urljoin

import orjson
import pyarrow as pa
import pytest

from laion_assets.core.crawl.candidates import Drop, clean_text, normalize_url, resolve_url
from laion_assets.core.crawl.extract import ExtractCounts, PairExtractor, extract_locations
from laion_assets.core.crawl.wat import ReadStats, iter_metadata_records
from laion_assets.core.offline.sample import _warc_member

WAT_501 = "CC-MAIN-2016-40-00000.first501.warc.wat.gz"


def extract(path: Path, crawl: str = "CC-MAIN-2016-40") -> tuple[pa.Table, ExtractCounts]:
    counts = ExtractCounts()
    table = PairExtractor().extract_file(str(path), path.name, crawl, counts)
    return table, counts


@pytest.fixture(scope="module")
def real(realdata: Path) -> tuple[pa.Table, ExtractCounts]:
    return extract(realdata / WAT_501)


def response_records(path: Path) -> list[tuple[int, dict]]:
    out = []
    for offset, payload in iter_metadata_records(str(path), ReadStats()):
        env = orjson.loads(payload)["Envelope"]
        if env["WARC-Header-Metadata"].get("WARC-Type") == "response":
            out.append((offset, env))
    return out


def img_links(env: dict) -> list[dict]:
    html = env["Payload-Metadata"]["HTTP-Response-Metadata"].get("HTML-Metadata") or {}
    return [link for link in html.get("Links", []) if link.get("path") == "IMG@/src"]


def keeps(alt: str) -> bool:
    return len(clean_text(alt, 1000)[0]) >= 5


def rewrite(src: Path, dest: Path, edit) -> None:
    """Copy a WAT file, passing each metadata record's JSON through edit (None drops the record)."""
    out = bytearray()
    for _, payload in iter_metadata_records(str(src), ReadStats()):
        doc = edit(orjson.loads(payload))
        if doc is not None:
            out += _warc_member([("WARC-Type", "metadata"), ("Content-Type", "application/json")], orjson.dumps(doc))
    dest.write_bytes(bytes(out))


def test_counts_on_the_real_excerpt_match_its_published_facts(real):
    _, c = real
    assert c.records == 500 and c.response_records == 166
    assert c.img_links == 3346
    assert c.img_links - c.dropped_no_alt == 1440  # IMG@/src links with a non-empty alt
    # Every link with an alt is either a pair or counted under exactly one rule.
    assert c.pairs + c.dropped_scheme + c.dropped_extension + c.dropped_invalid_url + c.dropped_short_text == 1440
    assert c.pairs == c.english + c.other_language + c.nolang
    assert c.corrupt_records == 0 and c.files_truncated == 0


def test_relative_urls_resolve_against_the_page(real, realdata):
    table, _ = real
    got = set(zip(table["page_url"].to_pylist(), table["url"].to_pylist(), strict=True))
    checked = 0
    for _, env in response_records(realdata / WAT_501):
        html = env["Payload-Metadata"]["HTTP-Response-Metadata"].get("HTML-Metadata") or {}
        if "Base" in html.get("Head", {}):
            continue
        page = env["WARC-Header-Metadata"]["WARC-Target-URI"]
        for link in img_links(env):
            src = link["url"]
            if link.get("alt") and keeps(link["alt"]) and src and not src.startswith(("http", "//", "data:")):
                want = normalize_url(urljoin(page, src))
                if isinstance(want, str):
                    assert (page, want) in got
                    checked += 1
    assert checked > 100  # the excerpt has ~970 relative image links


def test_head_base_wins_over_the_page_url(realdata, real):
    table, _ = real
    rows = table.to_pylist()
    checked = 0
    for _, env in response_records(realdata / WAT_501):
        html = env["Payload-Metadata"]["HTTP-Response-Metadata"].get("HTML-Metadata") or {}
        base = html.get("Head", {}).get("Base")
        page = env["WARC-Header-Metadata"]["WARC-Target-URI"]
        if not base or urljoin(page, base) == page:
            continue
        for link in img_links(env):
            src = link["url"]
            if link.get("alt") and src and not src.startswith(("http", "//", "data:")):
                want = normalize_url(urljoin(urljoin(page, base), src))
                if isinstance(want, str) and keeps(link["alt"]):
                    assert any(r["page_url"] == page and r["url"] == want for r in rows), (page, base, src)
                    checked += 1
    assert checked > 0


def test_protocol_relative_urls_take_the_page_scheme(realdata, real):
    table, _ = real
    urls = set(table["url"].to_pylist())
    checked = 0
    for _, env in response_records(realdata / WAT_501):
        page = env["WARC-Header-Metadata"]["WARC-Target-URI"]
        for link in img_links(env):
            src = link["url"]
            if src.startswith("//") and link.get("alt") and keeps(link["alt"]):
                want = normalize_url(page.split(":")[0] + ":" + src)
                if isinstance(want, str):
                    assert want in urls
                    checked += 1
    assert checked > 10


def test_only_http_urls_and_no_svg_or_gif_survive(real):
    table, c = real
    for url in table["url"].to_pylist():
        assert url.startswith(("http://", "https://"))
        assert not url.split("?")[0].lower().endswith((".svg", ".gif"))
    assert c.dropped_scheme >= 6  # the excerpt's data: images with an alt
    assert c.dropped_extension > 0


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("data:image/gif;base64,R0lGOD", Drop.SCHEME),
        ("javascript:void(0)", Drop.SCHEME),
        ("mailto:someone@example.org", Drop.SCHEME),
        ("ftp://example.org/a.jpg", Drop.SCHEME),
        ("file:///etc/passwd", Drop.SCHEME),
        ("/img/logo.SVG", Drop.EXTENSION),
        ("anim.gif?x=1", Drop.EXTENSION),
        ("", Drop.INVALID_URL),
        ("http://[::1/a.jpg", Drop.INVALID_URL),
        ("HTTP://Example.ORG:80/A.jpg#frag", "http://example.org/A.jpg"),
        ("https://example.org:443?x=1", "https://example.org/?x=1"),
        ("//cdn.example.org/a b.jpg", "https://cdn.example.org/a%20b.jpg"),
        ("../img/\n a.jpg", "https://site.example/img/%20a.jpg"),
        ("pic.jpg", "https://site.example/dir/pic.jpg"),
    ],
)
def test_resolve_url(raw, want):
    assert resolve_url(raw, "https://site.example/dir/page.html", "https") == want


def test_text_normalization():
    assert clean_text("  a\tb\n\nc  ", 100) == ("a b c", False)
    assert clean_text("Tom &amp; Jerry", 100) == ("Tom & Jerry", False)
    assert clean_text("CafÃ© au lait", 100)[0] == "Café au lait"  # mojibake repaired
    assert clean_text("bad\x00\x07 byte\ufffdhere", 100)[0] == "bad byte here"
    assert clean_text("x" * 50, 10) == ("x" * 10, True)


def test_short_texts_are_dropped_and_counted(real):
    table, c = real
    assert c.dropped_short_text > 0
    assert min(len(t) for t in table["text"].to_pylist()) >= 5
    for text in table["text"].to_pylist():
        assert text == " ".join(text.split()) and text.isprintable()


def test_language_codes_and_probabilities(real):
    table, c = real
    langs = table["language"].to_pylist()
    scores = table["language_score"].to_pylist()
    assert c.english > 0 and c.nolang > 0 and c.other_language > 0
    assert all(0.0 <= s <= 1.0 for s in scores)
    ex = PairExtractor()
    assert ex._text("A photograph of a dog playing in the park")[1] == "en"
    assert ex._text("Ein Hund spielt im Park mit einem roten Ball")[1] == "de"
    assert ex._text("IMG_2041.JPG")[1] == ""  # not reliable: nolang
    assert "en" in langs


def test_provenance_points_back_at_the_record(real, realdata):
    table, _ = real
    path = realdata / WAT_501
    by_offset = dict(response_records(path))
    for row in table.slice(0, 50).to_pylist():
        env = by_offset[row["record_offset"]]
        assert env["WARC-Header-Metadata"]["WARC-Target-URI"] == row["page_url"]
        assert env["WARC-Header-Metadata"]["WARC-Record-ID"] == row["record_id"]
        assert row["wat_file"] == WAT_501 and row["crawl"] == "CC-MAIN-2016-40"
        link = env["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"][row["link_index"]]
        assert link["path"] == "IMG@/src"


def test_list_form_headers_give_the_same_pairs(realdata, tmp_path, real):
    """CC-MAIN-2024-51 onwards writes repeated headers as JSON lists."""

    def listify(doc):
        env = doc["Envelope"]
        warc = env["WARC-Header-Metadata"]
        for key in ("WARC-Type", "WARC-Target-URI", "WARC-Record-ID"):
            if key in warc:
                warc[key] = [warc[key]]
        http = env.get("Payload-Metadata", {}).get("HTTP-Response-Metadata")
        if http:
            http.setdefault("Headers", {})["X-Robots-Tag"] = ["noimageai", "noarchive"]
            http["Headers"]["Set-Cookie"] = ["a=1", "b=2"]
        return doc

    listed = tmp_path / "listed.warc.wat.gz"
    rewrite(realdata / WAT_501, listed, listify)
    table, c = extract(listed)
    base, _ = real
    assert c.pairs == base.num_rows
    assert table["url"].to_pylist() == base["url"].to_pylist()
    assert table["page_url"].to_pylist() == base["page_url"].to_pylist()
    assert set(table["robots"].to_pylist()) == {"noimageai, noarchive"}


def test_records_without_alt_or_links(realdata):
    _, c = extract(realdata / "CC-MAIN-2023-06.sample1.warc.wat.gz")
    assert c.img_links == 27 and c.dropped_no_alt == 27 and c.pairs == 0
    _, c = extract(realdata / "CC-MAIN-2024-22.whirlwind.warc.wat.gz")
    assert c.pairs == 0 and c.img_links == 0 and c.corrupt_records == 0


def test_uncompressed_wat(realdata):
    table, c = extract(realdata / "CC-MAIN-2014-35-00006.fixture.warc.wat")
    assert c.records == 8
    assert c.pairs == table.num_rows


def test_corrupt_record_is_counted_and_the_rest_kept(realdata, tmp_path, real):
    src = realdata / WAT_501
    out = bytearray()
    broken = 0
    for _, payload in iter_metadata_records(str(src), ReadStats()):
        if b"IMG@/src" in payload and broken == 0:
            payload = payload[: len(payload) // 2]  # a JSON document cut in half
            broken = 1
        out += _warc_member([("WARC-Type", "metadata"), ("Content-Type", "application/json")], payload)
    path = tmp_path / "corrupt.warc.wat.gz"
    path.write_bytes(bytes(out))
    table, c = extract(path)
    base, _ = real
    assert c.corrupt_records == 1
    assert 0 < base.num_rows - table.num_rows < 100


def test_truncated_and_garbled_gzip_members(realdata, tmp_path, real):
    data = (realdata / WAT_501).read_bytes()
    cut = tmp_path / "cut.warc.wat.gz"
    cut.write_bytes(data[: len(data) // 2])
    table, c = extract(cut)
    assert c.files_truncated == 1
    assert 0 < table.num_rows < real[0].num_rows

    garbled = bytearray(data)
    mid = len(garbled) // 2
    for i in range(mid, mid + 200):
        garbled[i] ^= 0x55
    path = tmp_path / "garbled.warc.wat.gz"
    path.write_bytes(bytes(garbled))
    table, c = extract(path)
    assert c.corrupt_members == 1 and c.records == 499  # one record lost, reading resumed after it
    assert real[0].num_rows - 30 < table.num_rows <= real[0].num_rows


def test_unfetchable_file_does_not_lose_the_others(realdata, tmp_path, loopback):
    tables = []
    report = extract_locations(
        [(str(tmp_path / "missing.warc.wat.gz"), "missing"), (f"{loopback.base}/gone.warc.wat.gz", "gone"),
         (str(realdata / WAT_501), WAT_501)],
        "CC-MAIN-2016-40",
        tables.append,
    )
    assert report.counts.files_failed == 2 and [n for n, _ in report.failed_files] == ["missing", "gone"]
    assert loopback.hits["/gone.warc.wat.gz"] == 1  # a 404 is not retried
    assert sum(t.num_rows for t in tables) == report.counts.pairs > 0


def test_remote_wat_is_retried_after_a_server_error(realdata, loopback):
    body = (realdata / WAT_501).read_bytes()
    calls = {"n": 0}

    def flaky(h):
        calls["n"] += 1
        if calls["n"] == 1:
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    loopback.routes["/wat.gz"] = flaky
    from laion_assets.core.settings import SourceSettings

    tables = []
    report = extract_locations([(f"{loopback.base}/wat.gz", "wat.gz")], "c", tables.append,
                               source=SourceSettings(backoff_s=0.01))
    assert calls["n"] == 2 and report.counts.files_failed == 0 and report.counts.records == 500


def test_sample_crawl_is_real_wat_for_warcio_and_fastwarc(sample_mirror):
    from warcio.archiveiterator import ArchiveIterator

    paths = gzip.decompress((sample_mirror / "crawl-data/CC-MAIN-2099-01/wat.paths.gz").read_bytes()).decode().split()
    assert len(paths) == 2
    for rel in paths:
        with open(sample_mirror / rel, "rb") as fh:
            recs = [r.rec_headers.get_header("WARC-Type") for r in ArchiveIterator(fh)]
        assert recs[0] == "warcinfo" and recs.count("metadata") == 12 * 3
        table, c = extract(sample_mirror / rel, "CC-MAIN-2099-01")
        assert c.records == 36 and c.response_records == 12 and c.pairs > 0
        # Every rule fires on the sample crawl.
        assert c.dropped_scheme and c.dropped_extension and c.dropped_no_alt and c.dropped_short_text
        assert c.english and c.other_language
