"""The extraction rules, each on real Common Crawl records from ../shared/realdata, checked against `reference`."""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import gcld3
import orjson
import pyarrow as pa
import pytest

from laion_assets.core.crawl import extract as stage
from laion_assets.core.crawl.candidates import Drop, clean_text, resolve_url
from laion_assets.core.crawl.extract import ExtractCounts, PairExtractor
from laion_assets.core.crawl.wat import ReadStats, iter_metadata_records
from laion_assets.offline.sample import _warc_member
from laion_assets_tests.crawl import reference
from laion_assets_tests.crawl.reference import Link, Reading

WAT_501 = "CC-MAIN-2016-40-00000.first501.warc.wat.gz"


def extract(path: Path, crawl: str = "CC-MAIN-2016-40") -> tuple[pa.Table, ExtractCounts]:
    counts = ExtractCounts()
    table = PairExtractor().extract_file(str(path), path.name, crawl, counts)
    return table, counts


@pytest.fixture(scope="module")
def real(realdata: Path) -> tuple[pa.Table, ExtractCounts]:
    return extract(realdata / WAT_501)


@pytest.fixture(scope="module")
def ref(realdata: Path) -> Reading:
    return reference.read(realdata / WAT_501)


def pairs_of(table: pa.Table) -> Counter[tuple[str, str]]:
    return Counter(zip(table["url"].to_pylist(), table["text"].to_pylist(), strict=True))


def differences(got: Counter[tuple[str, str]], want: Counter[tuple[str, str]]) -> str:
    """The pairs only one side has, for a failure message that names the links."""
    only_got, only_want = list((got - want).items())[:10], list((want - got).items())[:10]
    return f"only the extractor: {only_got}; only the reference: {only_want}"


def sample_wats(mirror: Path) -> list[Path]:
    listing = gzip.decompress((mirror / "crawl-data/CC-MAIN-2099-01/wat.paths.gz").read_bytes()).decode().split()
    return [mirror / rel for rel in listing]


def response_records(path: Path) -> list[tuple[int, dict]]:
    out = []
    for offset, payload in iter_metadata_records(str(path), ReadStats()):
        env = orjson.loads(payload)["Envelope"]
        if env["WARC-Header-Metadata"].get("WARC-Type") == "response":
            out.append((offset, env))
    return out


def rewrite(src: Path, dest: Path, edit) -> None:
    """Copy a WAT file, passing each metadata record's JSON through edit (None drops the record)."""
    out = bytearray()
    for _, payload in iter_metadata_records(str(src), ReadStats()):
        doc = edit(orjson.loads(payload))
        if doc is not None:
            out += _warc_member([("WARC-Type", "metadata"), ("Content-Type", "application/json")], orjson.dumps(doc))
    dest.write_bytes(bytes(out))


def test_the_reference_reading_gives_the_readme_facts(ref):
    assert ref.records == 500 and ref.response_records == 166
    assert ref.img_links == 3346 and len(ref.links) == 1440  # IMG@/src links, those with a non-empty alt
    plain = ref.plain_pairs()
    assert len(plain) == 1434 and len({url for url, _ in plain}) == 757


def test_counters_are_the_reference_drops(real, ref):
    _, c = real
    assert (c.records, c.response_records, c.img_links) == (ref.records, ref.response_records, ref.img_links)
    assert c.dropped_no_alt == ref.img_links - len(ref.links)
    for rule in reference.RULES:
        dropped = ref.drops[rule]
        assert getattr(c, f"dropped_{rule}") == len(dropped), (rule, [(x.page_url, x.src, x.alt) for x in dropped][:10])
    assert c.pairs == len(ref.kept)
    assert c.corrupt_records == 0 and c.files_truncated == 0 and c.corrupt_members == 0


def test_the_plain_rule_reconciles_with_the_pair_count(real, ref):
    """From the README's 1,434 plain-rule pairs to the extractor's count, one rule at a time."""
    _, c = real
    plain = ref.plain_pairs()
    # The plain rule's "resolved URL" already leaves out the data: images, which are the scheme rule's drops.
    assert len(ref.links) - len(plain) == c.dropped_scheme == len(ref.drops["scheme"]) == 6
    assert {x.src.partition(":")[0] for x in ref.drops["scheme"]} == {"data"}
    # The plain rule resolves an empty src to the page itself; it points at no image.
    assert all(x.src == "" and x.plain_url == x.page_url for x in ref.drops["invalid_url"])
    assert len({x.page_url for x in ref.drops["invalid_url"]}) == 3
    assert all(urlsplit(x.plain_url).path.lower().endswith(".gif") for x in ref.drops["extension"])
    left = len(plain)
    for rule, dropped in (("invalid_url", 29), ("extension", 415), ("short_text", 162)):
        assert getattr(c, f"dropped_{rule}") == len(ref.drops[rule]) == dropped, rule
        left -= dropped
    assert left == c.pairs == len(ref.kept) == 828


def test_pairs_are_the_reference_pairs(real, ref):
    table, _ = real
    assert pairs_of(table) == ref.pairs(), differences(pairs_of(table), ref.pairs())


def test_language_counters_count_cld3s_reliable_answers(real, ref):
    _, c = real
    detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    answers = [detector.FindLanguage(text) for _, _, text in ref.kept]
    languages = Counter(a.language if a.is_reliable else "" for a in answers)
    assert (c.english, c.nolang) == (languages["en"], languages[""])
    assert c.other_language == sum(n for lang, n in languages.items() if lang not in ("en", ""))


def kept_where(ref: Reading, test: Callable[[Link], bool]) -> list[tuple[Link, str]]:
    return [(link, url) for link, url, _ in ref.kept if test(link)]


def is_relative(src: str) -> bool:
    return not urlsplit(src.strip()).scheme and not src.strip().startswith("//")


def test_relative_urls_resolve_against_the_page(real, ref):
    table, _ = real
    got = set(zip(table["page_url"].to_pylist(), table["url"].to_pylist(), strict=True))
    relative = kept_where(ref, lambda x: x.base == x.page_url and is_relative(x.src))
    assert len(relative) > 100
    for link, url in relative:
        assert (link.page_url, url) in got, link


def test_head_base_wins_over_the_page_url(real, ref):
    table, _ = real
    got = set(zip(table["page_url"].to_pylist(), table["url"].to_pylist(), strict=True))
    based = kept_where(ref, lambda x: x.base != x.page_url and is_relative(x.src))
    assert based
    for link, url in based:
        assert (link.page_url, url) in got, link
    # Resolving against the page alone would have given other URLs.
    assert any(urljoin(link.page_url, link.src) != urljoin(link.base, link.src) for link, _ in based)


def test_protocol_relative_urls_take_the_page_scheme(real, ref):
    table, _ = real
    got = set(zip(table["page_url"].to_pylist(), table["url"].to_pylist(), strict=True))
    protocol_relative = kept_where(ref, lambda x: x.src.strip().startswith("//"))
    assert len(protocol_relative) > 10
    for link, url in protocol_relative:
        assert url.partition(":")[0] == link.base.partition(":")[0].lower()
        assert (link.page_url, url) in got, link


def test_only_http_urls_and_no_svg_or_gif_survive(real):
    table, _ = real
    for url in table["url"].to_pylist():
        assert url.startswith(("http://", "https://"))
        assert not urlsplit(url).path.lower().endswith((".svg", ".svgz", ".gif"))


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
    page = "https://site.example/dir/page.html"
    assert resolve_url(raw, page, "https") == want
    # The reference agrees on each crafted case, so its agreement on the real file covers these rules too.
    got = reference.apply_rules(Link(page, page, raw, "alt text"))
    assert got == (want.value.removeprefix("dropped_") if isinstance(want, Drop) else (want, "alt text"))


def test_text_normalization():
    assert clean_text("  a\tb\n\nc  ", 100) == ("a b c", False)
    assert clean_text("Tom &amp; Jerry", 100) == ("Tom & Jerry", False)
    assert clean_text("CafÃ© au lait", 100)[0] == "Café au lait"  # mojibake repaired
    assert clean_text("bad\x00\x07 byte\ufffdhere", 100)[0] == "bad byte here"
    assert clean_text("x" * 50, 10) == ("x" * 10, True)


def test_short_texts_are_dropped(real):
    table, _ = real
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
    # The header first; then, for some pages, their robots meta tags.
    assert {r.partition(";")[0] for r in table["robots"].to_pylist()} == {"noimageai, noarchive"}


def test_records_without_alt_or_links(realdata):
    _, c = extract(realdata / "CC-MAIN-2023-06.sample1.warc.wat.gz")
    assert c.img_links == 27 and c.dropped_no_alt == 27 and c.pairs == 0
    _, c = extract(realdata / "CC-MAIN-2024-22.whirlwind.warc.wat.gz")
    assert c.pairs == 0 and c.img_links == 0 and c.corrupt_records == 0


def test_uncompressed_wat(realdata):
    path = realdata / "CC-MAIN-2014-35-00006.fixture.warc.wat"
    table, c = extract(path)
    ref = reference.read(path)
    assert c.records == ref.records == 8
    assert (c.img_links, c.dropped_short_text) == (ref.img_links, len(ref.drops["short_text"])) == (4, 2)
    assert pairs_of(table) == ref.pairs() and len(ref.kept) == 2


def test_corrupt_record_is_counted_and_the_rest_kept(realdata, tmp_path):
    member = [("WARC-Type", "metadata"), ("Content-Type", "application/json")]
    corrupt, without = bytearray(), bytearray()
    broken = False
    for _, payload in iter_metadata_records(str(realdata / WAT_501), ReadStats()):
        if b"IMG@/src" in payload and not broken:
            corrupt += _warc_member(member, payload[: len(payload) // 2])  # a JSON document cut in half
            broken = True
            continue
        corrupt += _warc_member(member, payload)
        without += _warc_member(member, payload)
    (tmp_path / "corrupt.warc.wat.gz").write_bytes(bytes(corrupt))
    (tmp_path / "without.warc.wat.gz").write_bytes(bytes(without))
    table, c = extract(tmp_path / "corrupt.warc.wat.gz")
    assert c.corrupt_records == 1
    # The cut record costs its own pairs and nothing else.
    want = reference.read(tmp_path / "without.warc.wat.gz").pairs()
    assert pairs_of(table) == want, differences(pairs_of(table), want)
    assert 0 < len(reference.read(realdata / WAT_501).kept) - table.num_rows


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


def test_unfetchable_file_does_not_lose_the_others(sample_mirror, tmp_path, loopback):
    wat = sample_wats(sample_mirror)[0]
    tables = []
    report = stage.run(
        [(str(tmp_path / "missing.warc.wat.gz"), "missing"), (f"{loopback.base}/gone.warc.wat.gz", "gone"),
         (str(wat), wat.name)],
        "CC-MAIN-2099-01",
        tables.append,
    )
    assert report.counts.files_failed == 2
    (missing, missing_error), (gone, gone_error) = report.failed_files
    assert (missing, gone) == ("missing", "gone")
    assert missing_error.endswith("missing.warc.wat.gz: no such file"), missing_error
    assert gone_error == f"{loopback.base}/gone.warc.wat.gz: HTTP 404", gone_error
    assert loopback.hits["/gone.warc.wat.gz"] == 1  # a 404 is not retried
    assert [t.num_rows for t in tables] == [len(reference.read(wat).kept)]


def test_remote_wat_is_retried_after_a_server_error(sample_mirror, loopback):
    from laion_assets.core.settings import SourceSettings

    wat = sample_wats(sample_mirror)[0]
    body = wat.read_bytes()
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
    tables = []
    report = stage.run([(f"{loopback.base}/wat.gz", "wat.gz")], "c", tables.append,
                               source=SourceSettings(backoff_s=0.01))
    assert calls["n"] == 2 and report.counts.files_failed == 0
    ref = reference.read(wat)
    assert report.counts.records == ref.records and pairs_of(tables[0]) == ref.pairs()


def test_sample_crawl_is_real_wat_for_warcio_and_fastwarc(sample_mirror):
    from warcio.archiveiterator import ArchiveIterator

    wats = sample_wats(sample_mirror)
    assert len(wats) == 2
    for wat in wats:
        with open(wat, "rb") as fh:
            recs = [r.rec_headers.get_header("WARC-Type") for r in ArchiveIterator(fh)]
        assert recs[0] == "warcinfo" and recs.count("metadata") == 12 * 3
        table, c = extract(wat, "CC-MAIN-2099-01")
        ref = reference.read(wat)
        assert (c.records, c.response_records, c.img_links) == (ref.records, ref.response_records, ref.img_links)
        assert (c.records, c.response_records) == (36, 12)
        for rule in reference.RULES:
            assert getattr(c, f"dropped_{rule}") == len(ref.drops[rule]), rule
        assert pairs_of(table) == ref.pairs(), differences(pairs_of(table), ref.pairs())
        # The sample crawl is made so that the rules fire on it.
        assert c.dropped_scheme and c.dropped_extension and c.dropped_no_alt and c.dropped_short_text
        assert c.english and c.other_language


def test_robots_meta_tags_and_the_header_are_recorded_for_our_agents(realdata, tmp_path, real):
    """Real records with an opt-out added: `noai` in a robots meta tag of some pages, `noimageai` in the
    X-Robots-Tag header of others; meta tags of other names (and other robots) are not recorded."""
    seen = {"n": 0}
    meta_pages: set[str] = set()
    header_pages: set[str] = set()

    def opt_out(doc):
        env = doc["Envelope"]
        http = env.get("Payload-Metadata", {}).get("HTTP-Response-Metadata")
        head = (http or {}).get("HTML-Metadata", {}).get("Head")
        if not head:
            return doc
        seen["n"] += 1
        url = env["WARC-Header-Metadata"]["WARC-Target-URI"]
        if seen["n"] % 3 == 0:  # the shape the WAT keeps: a list of {"name", "content"}, names in any case
            head["Metas"] = [*head.get("Metas", []), {"content": "NOAI, noindex", "name": "Robots"},
                             {"content": "noimageai", "name": "googlebot"}, {"content": "x"}]
            meta_pages.add(url)
        elif seen["n"] % 3 == 1:
            http.setdefault("Headers", {})["X-Robots-Tag"] = ["noimageai", "noarchive"]
            header_pages.add(url)
        return doc

    path = tmp_path / "optout.warc.wat.gz"
    rewrite(realdata / WAT_501, path, opt_out)
    table, c = extract(path)
    base, _ = real
    assert c.pairs == base.num_rows  # the pairs are the same; only what the page says is added
    robots = dict(zip(table["page_url"].to_pylist(), table["robots"].to_pylist(), strict=True))
    some_meta = [robots[p] for p in meta_pages if p in robots]
    some_header = [robots[p] for p in header_pages if p in robots]
    assert some_meta and all(r.endswith("meta robots: noai, noindex") and "googlebot" not in r for r in some_meta)
    assert some_header and all(r.startswith("noimageai, noarchive") for r in some_header)
    untouched = set(robots) - meta_pages - header_pages
    assert all("noai" not in robots[p] and "noimageai" not in robots[p] for p in untouched)
