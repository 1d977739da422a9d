"""A second chance (`--retry-failed`): only transient failures are fetched again, and a shard is rewritten with the
same keys in the same order, its untouched samples byte for byte; each row counts its attempts and runs."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.core.download.distributor import run as download
from laion_assets.core.download.report import is_transient
from laion_assets.core.settings import DownloadSettings
from laion_assets.core.storage import Storage
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets_tests.conftest import LoopbackServer
from laion_assets_tests.download.test_resume import FETCH, url_list
from laion_assets_tests.handlers import cut_after, respond


@pytest.mark.parametrize(("status", "error", "http_status", "transient"), [
    ("success", None, 200, False),
    ("failed_to_download", "HTTP 503", 503, True),
    ("failed_to_download", "HTTP 500", 500, True),
    ("failed_to_download", "HTTP 429", 429, True),
    ("failed_to_download", "HTTP 408", 408, True),
    ("failed_to_download", "HTTP 425", 425, True),
    ("failed_to_download", "HTTP 404", 404, False),
    ("failed_to_download", "HTTP 403", 403, False),
    ("failed_to_download", "total deadline of 30 s exceeded", None, True),
    ("failed_to_download", "ServerTimeoutError: Timeout on reading data from socket", None, True),
    ("failed_to_download", "ConnectionTimeoutError: Connection timeout to host http://h/a.jpg", None, True),
    ("failed_to_download", "ServerDisconnectedError: Server disconnected", None, True),
    ("failed_to_download", "ClientPayloadError: Response payload is not completed", None, True),
    ("failed_to_download", "ClientOSError: [Errno 104] Connection reset by peer", None, True),
    ("failed_to_download", "cannot resolve h.test: [Errno -3] Temporary failure in name resolution", None, True),
    ("failed_to_download", "cannot resolve h.test: [Errno -2] Name or service not known", None, False),
    ("failed_to_download", "dns_temporary: h.test: SERVFAIL (reading robots.txt of http://h.test)", None, True),
    ("failed_to_download", "dns_nxdomain: h.test does not exist", None, False),
    ("failed_to_download", "h.test resolves to a forbidden address: 10.0.0.1 (private)", None, False),
    ("failed_to_download", "ClientConnectorError: Cannot connect to host h:80 [Connect call failed]", None, False),
    ("failed_to_download", "Content-Length 99999999 is over the cap of 26214400 bytes", 200, False),
    ("failed_to_download", "more than 5 redirects", None, False),
    ("failed_to_download", "no URL", None, False),
    ("skipped_by_policy", "policy_unreachable: robots.txt of http://h answered HTTP 503 after 3 tries: disallow all"
     " (RFC 9309)", None, True),
    ("skipped_by_policy", "robots.txt of http://h disallows /a.jpg for laion-assets", None, False),
    ("skipped_by_policy", "X-Robots-Tag: noai", None, False),
    ("skipped_by_policy", "page_opt_out: page http://p/ opted out of AI use: noai (X-Robots-Tag)", None, False),
    ("failed_to_resize", "image file is truncated", None, False),
])
def test_transient_or_permanent(status, error, http_status, transient):
    assert is_transient(status, error, http_status) is transient


def jpeg(i: int) -> bytes:
    return jpeg_bytes(render(Scene("circle", "blue", "yellow", "left"), (300 + 10 * i, 240), seed=i))


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def raw_members(path: Path) -> dict[str, bytes]:
    """Each member's header and data blocks as they lie in the file."""
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: data[m.offset:m.offset_data + ((m.size + 511) // 512) * 512] for m in tar}


def test_retry_failed_refetches_only_transient_failures(loopback, tmp_path):
    # Shard 0: ok, 503 then ok, 404, ok. Shard 1: a reset then ok, ok, 429 then ok, disallowed. Shard 2: all ok.
    names = ["ok0", "flaky1", "gone2", "ok3", "reset4", "ok5", "busy6", "private/7", "ok8", "ok9", "ok10", "ok11"]
    bodies = {n: jpeg(i) for i, n in enumerate(names)}
    loopback.static("/robots.txt", b"User-agent: *\nDisallow: /private/\n", "text/plain")
    for n in names:
        loopback.routes[f"/{n}.jpg"] = respond(200, bodies[n], {"Content-Type": "image/jpeg"})
    loopback.routes["/flaky1.jpg"] = respond(503)
    loopback.routes["/gone2.jpg"] = respond(404)
    loopback.routes["/reset4.jpg"] = cut_after(bodies["reset4"], 100)
    loopback.routes["/busy6.jpg"] = respond(429)
    urls = url_list(tmp_path / "urls.parquet", [f"{loopback.base}/{n}.jpg" for n in names])
    out = tmp_path / "out"
    store = Storage(str(out))
    settings = DownloadSettings(samples_per_shard=4, processes=1, fetch=dataclasses.replace(FETCH, retries=0))
    first = download(urls, store, "", settings)
    assert first.statuses["success"] == 7 and first.retryable == 3 and first.retried == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rows_before = [pq.read_table(out / f"0000{s}.parquet").to_pylist() for s in range(3)]
    assert {r["runs"] for rows in rows_before for r in rows} == {1}
    assert [r["attempts"] for r in rows_before[0]] == [1, 1, 1, 1]

    for n in ("flaky1", "reset4", "busy6"):  # the hiccups are over; the 404 stays a 404
        loopback.routes[f"/{n}.jpg"] = respond(200, bodies[n], {"Content-Type": "image/jpeg"})
    hits = dict(loopback.hits)
    second = download(urls, store, "", dataclasses.replace(settings, retry_failed=True))
    assert second.retried == 3 and second.recovered == 3 and second.shards_rewritten == 2 and second.rows == 0
    assert second.statuses["success"] == 10 and second.retryable == 0
    fetched = {p: loopback.hits[p] - hits.get(p, 0) for p in loopback.hits if loopback.hits[p] != hits.get(p, 0)}
    assert set(fetched) == {"/flaky1.jpg", "/reset4.jpg", "/busy6.jpg", "/robots.txt", "/.well-known/tdmrep.json"}

    # The shard without transient failures is not touched; the others keep their keys, order and samples.
    for suffix in (".tar", ".parquet", "_stats.json"):
        assert (out / f"00002{suffix}").read_bytes() == before[f"00002{suffix}"]
    for s, retried in ((0, {"000001"}), (1, {"000010", "000012"})):
        rows = pq.read_table(out / f"0000{s}.parquet").to_pylist()
        assert [r["key"] for r in rows] == [r["key"] for r in rows_before[s]]
        for old, new in zip(rows_before[s], rows, strict=True):
            if new["key"] in retried:
                assert new["status"] == "success" and new["runs"] == 2 and new["attempts"] == 2
            else:
                assert new == old
        (tmp_path / "old.tar").write_bytes(before[f"0000{s}.tar"])
        old_raw, new_raw = raw_members(tmp_path / "old.tar"), raw_members(out / f"0000{s}.tar")
        assert all(new_raw[name] == blob for name, blob in old_raw.items())  # byte for byte, headers included
        new_names = [name for name, _ in tar_members(out / f"0000{s}.tar")]
        added = {n.partition(".")[0] for n in set(new_names) - set(old_raw)}
        assert new_names == sorted(new_names) and added == retried
    (gone,) = [r for r in pq.read_table(out / "00000.parquet").to_pylist() if r["key"] == "000002"]
    assert gone["status"] == "failed_to_download" and gone["runs"] == 1 and gone["http_status"] == 404

    third = download(urls, store, "", dataclasses.replace(settings, retry_failed=True))
    assert third.retried == 0 and third.shards_rewritten == 0


def test_an_unreachable_robots_txt_is_asked_again_by_a_later_run(tmp_path):
    server = LoopbackServer()
    try:
        server.routes["/robots.txt"] = respond(503)
        server.routes["/a.jpg"] = respond(200, jpeg(1), {"Content-Type": "image/jpeg"})
        urls = url_list(tmp_path / "urls.parquet", [f"{server.base}/a.jpg"])
        store = Storage(str(tmp_path / "out"))
        settings = DownloadSettings(samples_per_shard=4, processes=1, fetch=dataclasses.replace(FETCH, retries=1))
        first = download(urls, store, "", settings)
        (row,) = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
        assert row["status"] == "skipped_by_policy" and row["error_message"].startswith("policy_unreachable")
        assert row["attempts"] == 0 and first.retryable == 1 and server.hits["/robots.txt"] == 2
        server.routes["/robots.txt"] = respond(404)
        second = download(urls, store, "", dataclasses.replace(settings, retry_failed=True))
        (row,) = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
        assert second.recovered == 1 and row["status"] == "success" and row["runs"] == 2 and row["attempts"] == 1
    finally:
        server.close()


def test_images_of_pages_that_opted_out_of_ai_use_are_skipped(loopback, tmp_path):
    pages = {  # page robots record (as extraction writes it) -> skipped?
        "": False,
        "noai": True,
        "noarchive; meta robots: noimageai, noindex": True,
        "meta ccbot: noai": True,
        "meta laion-assets: noimageai": True,
        "otherbot: noai": False,
        "noindex; meta robots: index, follow": False,
        "meta googlebot: noai": False,
    }
    for i in range(len(pages)):
        loopback.routes[f"/{i}.jpg"] = respond(200, jpeg(i), {"Content-Type": "image/jpeg"})
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{loopback.base}/{i}.jpg" for i in range(len(pages))],
                             "page_url": [f"http://page{i}.test/" for i in range(len(pages))],
                             "robots": list(pages)}), path)
    settings = DownloadSettings(samples_per_shard=100, processes=1, fetch=FETCH)
    report = download(str(path), Storage(str(tmp_path / "on")), "", settings)
    rows = pq.read_table(tmp_path / "on" / "00000.parquet").to_pylist()
    for i, (row, skipped) in enumerate(zip(rows, pages.values(), strict=True)):
        if skipped:
            assert row["status"] == "skipped_by_policy" and row["attempts"] == 0, row
            assert row["error_message"].startswith(f"page_opt_out: page http://page{i}.test/ opted out of AI use: ")
            assert f"/{i}.jpg" not in loopback.hits
        else:
            assert row["status"] == "success", row
    assert report.page_opt_outs == 4 and report.metadata()["skipped_page_opt_out"] == 4
    assert rows[2]["error_message"].endswith("noimageai (<meta name=robots>)")
    assert rows[1]["error_message"].endswith("noai (X-Robots-Tag)")

    off = dataclasses.replace(settings, fetch=dataclasses.replace(FETCH, respect_page_opt_out=False))
    assert download(str(path), Storage(str(tmp_path / "off")), "", off).statuses["success"] == len(pages)


def test_retry_failed_keeps_the_added_columns_of_img2dataset_layouts(loopback, tmp_path):
    """A webdataset download with added row columns (DataComp's uid, compute_hash md5) gets its second chance too:
    the retried row carries its uid and md5 like the others, in the Parquet rows and the sample's .json."""
    import hashlib
    import json

    names = ["ok0", "flaky1", "ok2"]
    bodies = {n: jpeg(i) for i, n in enumerate(names)}
    for n in names:
        loopback.routes[f"/{n}.jpg"] = respond(200, bodies[n], {"Content-Type": "image/jpeg"})
    loopback.routes["/flaky1.jpg"] = respond(503)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{loopback.base}/{n}.jpg" for n in names],
                             "uid": [f"{i:032x}" for i in range(3)]}), urls)
    out = tmp_path / "out"
    settings = DownloadSettings(samples_per_shard=3, processes=1, min_image_bytes=0, compute_hash="md5",
                                save_additional_columns=("uid",), fetch=dataclasses.replace(FETCH, retries=0))
    assert download(str(urls), Storage(str(out)), "", settings).retryable == 1
    old_raw = raw_members(out / "00000.tar")
    loopback.routes["/flaky1.jpg"] = respond(200, bodies["flaky1"], {"Content-Type": "image/jpeg"})
    second = download(str(urls), Storage(str(out)), "", dataclasses.replace(settings, retry_failed=True))
    assert second.recovered == 1 and second.statuses["success"] == 3
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["uid"] for r in rows] == [f"{i:032x}" for i in range(3)]
    assert rows[1]["md5"] == hashlib.md5(bodies["flaky1"]).hexdigest() and rows[1]["runs"] == 2
    members = dict(tar_members(out / "00000.tar"))
    assert json.loads(members["000001.json"])["uid"] == f"{1:032x}"
    new_raw = raw_members(out / "00000.tar")
    assert all(new_raw[name] == blob for name, blob in old_raw.items())  # the others byte for byte
    stats = json.loads((out / "00000_stats.json").read_text())  # img2dataset's fields follow the rewrite
    assert (stats["successes"], stats["failed_to_download"], stats["status_dict"]) == (3, 0, {"success": 3})


def test_retry_failed_refuses_the_files_and_parquet_layouts(loopback, tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{loopback.base}/a.jpg"]}), urls)
    settings = DownloadSettings(output_format="files", retry_failed=True, fetch=FETCH)
    with pytest.raises(ValueError, match="retry_failed works on webdataset shards, not files output"):
        download(str(urls), Storage(str(tmp_path / "out")), "", settings)
