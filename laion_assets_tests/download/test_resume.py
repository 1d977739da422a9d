"""Resume that can be trusted: a killed download rerun after its input, its settings or its plan changed ends
byte-identical to a fresh download of the new input; complete shards that still match are not redone."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.download.distributor import run as download
from laion_assets.core.download.distributor import split_work
from laion_assets.core.download.plan import make_plan, read_manifest
from laion_assets.core.download.reader import Inputs
from laion_assets.core.settings import DownloadSettings, FetchSettings, ResizeSettings
from laion_assets.core.storage import Storage
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets_tests.handlers import respond

FETCH = FetchSettings(allow_networks=("127.0.0.1/32",), deadline_s=5.0, backoff_s=0.01, connect_timeout_s=2.0)


def serve_images(loopback, n: int, delay: float = 0.0) -> list[str]:
    def slow(body: bytes):
        def handler(h):
            time.sleep(delay)
            respond(200, body, {"Content-Type": "image/jpeg"})(h)
        return handler

    for i in range(n):
        body = jpeg_bytes(render(Scene("circle", "blue", "yellow", "left"), (300 + 10 * i, 240), seed=i))
        loopback.routes[f"/{i}.jpg"] = slow(body)
    return [f"{loopback.base}/{i}.jpg" for i in range(n)]


def url_list(path: Path, urls: list[str]) -> str:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption of {u.rsplit('/', 1)[-1]}" for u in urls]}), path)
    return str(path)


def cli_args(urls: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "laion_assets.cli", "download", urls, "--output-dir", str(out),
            "--samples-per-shard", "4", "--allow-network", "127.0.0.1/32", "--processes", "1", *extra]


def killed_midway(urls: str, out: Path, *extra: str) -> set[str]:
    """Run the CLI and SIGKILL it once its first shard is complete; the names of the complete shards."""
    proc = subprocess.Popen([*cli_args(urls, out, *extra), "--connections", "2", "--per-host", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob("*_stats.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name for p in out.glob("*_stats.json")}
    assert done and not (out / "_manifest.json").exists(), "the run should have been killed part-way"
    return done


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, the shard markers without their timing."""
    files = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name.endswith("_stats.json"):
            doc = orjson.loads(data)
            for timing in ("duration_s", "duration", "start_time", "end_time"):
                doc.pop(timing)
            data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        files[p.name] = data
    return files


def marker_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*_stats.json")}


def fresh(urls: str, out: Path, *extra: str) -> dict[str, bytes]:
    subprocess.run(cli_args(urls, out, *extra), check=True, capture_output=True)
    return outputs(out)


def test_killed_then_input_changed(loopback, tmp_path):
    urls = serve_images(loopback, 16, delay=0.05)
    first = url_list(tmp_path / "a.parquet", urls[:12])
    out = tmp_path / "out"
    killed_midway(first, out)
    subprocess.run(cli_args(first, out), check=True, capture_output=True)
    before = marker_times(out)
    # Row 5 (in shard 00001) now names another image; shards 00000 and 00002 keep their rows.
    edited = url_list(tmp_path / "b.parquet", [*urls[:5], urls[13], *urls[6:12]])
    result = subprocess.run(cli_args(edited, out), check=True, capture_output=True, text=True)
    assert "1 redone" in result.stdout
    after = marker_times(out)
    assert after["00000_stats.json"] == before["00000_stats.json"]
    assert after["00002_stats.json"] == before["00002_stats.json"]
    assert after["00001_stats.json"] != before["00001_stats.json"]
    assert outputs(out) == fresh(edited, tmp_path / "fresh")


def test_killed_then_a_setting_changed(loopback, tmp_path):
    urls = url_list(tmp_path / "a.parquet", serve_images(loopback, 12, delay=0.05))
    out = tmp_path / "out"
    killed_midway(urls, out)
    subprocess.run(cli_args(urls, out, "--image-size", "128"), check=True, capture_output=True)
    assert outputs(out) == fresh(urls, tmp_path / "fresh", "--image-size", "128")
    stats = orjson.loads((out / "00000_stats.json").read_bytes())
    assert stats["rows"] == [0, 4] and len(stats["input_fingerprint"]) == 32 and stats["settings"]


def test_killed_then_the_plan_shrank(loopback, tmp_path):
    all_urls = serve_images(loopback, 12, delay=0.05)
    out = tmp_path / "out"
    killed_midway(url_list(tmp_path / "a.parquet", all_urls), out)
    subprocess.run(cli_args(url_list(tmp_path / "a.parquet", all_urls), out), check=True, capture_output=True)
    assert (out / "00002.tar").exists()
    shorter = url_list(tmp_path / "b.parquet", all_urls[:6])  # two shards, the second one half full
    result = subprocess.run(cli_args(shorter, out), check=True, capture_output=True, text=True)
    assert not any(p.name.startswith("00002") for p in out.iterdir())  # beyond the plan: removed
    assert "1 redone" in result.stdout  # shard 00001 now ends at row 6
    assert outputs(out) == fresh(shorter, tmp_path / "fresh")
    assert [s.name for s in read_manifest(Storage(str(out)), "").shards] == ["00000", "00001"]


def test_fewer_shards_than_processes_still_uses_every_process_and_writes_the_same_bytes(loopback, tmp_path):
    urls = url_list(tmp_path / "a.parquet", serve_images(loopback, 10))
    settings = DownloadSettings(samples_per_shard=8, processes=1, fetch=FETCH, resize=ResizeSettings(image_size=96))
    one = download(urls, Storage(str(tmp_path / "one")), "", settings)
    three = download(urls, Storage(str(tmp_path / "three")), "", dataclasses.replace(settings, processes=3))
    assert one.statuses == three.statuses and three.statuses["success"] == 10
    assert outputs(tmp_path / "one") == outputs(tmp_path / "three")
    # Two shards for three processes: every process gets a piece.
    plan = make_plan(Inputs(pq.read_table(urls).append_column("language", pa.nulls(10, pa.string()))), settings)
    work = split_work(list(plan.shards), 3)
    assert len(work) == 3 and all(work)
    assert sorted((i.lo, i.hi) for items in work for i in items) == [(0, 4), (4, 8), (8, 9), (9, 10)]
    assert not [p for p in os.listdir(tmp_path / "three") if p.startswith(".tmp")]
