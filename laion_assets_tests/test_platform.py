"""The platform with its real parts: Debian's PostgreSQL, `dagster-daemon run` and `dagster-webserver` against it,
and headless Chromium on the web UI.

A first crawl is materialized in-process into the same instance. A second crawl appears in the mirror: the
new_crawls sensor registers it and launches one backfill, whose runs go through the queue until every asset of
the crawl is materialized; meanwhile the process of a download run is killed mid-shard (the code server reports
the run failed, the daemon retries it) and the retry's shards are byte-identical to an undisturbed run. Then the
English threshold changes in the model registry: clip_scores is re-filtered without rescoring and what depends on
it follows, as the UI shows.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import orjson
import pytest
from click.testing import CliRunner

from laion_assets.cli import main as cli
from laion_assets.core import paths
from laion_assets.core.settings import SampleSettings
from laion_assets.offline.sample import build_sample_crawl
from laion_assets_tests.graph import CLIP_STAGE, LAYOUT, Graph, graph_resources
from laion_assets_tests.platform import crawled, kill_run_of, process_on_local_port, running_platform, wait_for

A, B = "CC-MAIN-2099-01", "CC-MAIN-2099-05"
SMALL = {"wat_files": 2, "pages_per_file": 6}
CRAWL_ASSETS = ["wat_manifest", "candidate_pairs", "unique_pairs", "image_shards", *CLIP_STAGE]


class SlowImages(http.server.ThreadingHTTPServer):
    """Serves the mirror's images a little slowly (a download run lasts long enough to be killed in the middle),
    and remembers the client port of each image request (to find the process that made it)."""

    daemon_threads = True

    def __init__(self, www: Path, delay_s: float) -> None:
        self.client_ports: list[int] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path.startswith("/img/"):
                    server.client_ports.append(self.client_address[1])
                    time.sleep(delay_s)
                super().do_GET()

        super().__init__(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
        self.base = f"http://127.0.0.1:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def materializations(instance: dg.DagsterInstance, asset: str, after: float = 0.0) -> list:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_timestamp=after), limit=1000).records
    return [r.asset_materialization for r in records]


def partitions_of(crawl: str, asset: str) -> set[str]:
    if asset == "wat_manifest":
        return {crawl}
    dim, keys = ("chunk", LAYOUT.chunk_keys()) if asset == "candidate_pairs" else ("bucket", LAYOUT.bucket_keys())
    return {str(dg.MultiPartitionKey({"crawl": crawl, dim: k})) for k in keys}


def all_materialized(instance: dg.DagsterInstance, crawl: str) -> bool:
    return all(partitions_of(crawl, a) <= instance.get_materialized_partitions(dg.AssetKey(a)) for a in CRAWL_ASSETS)


def shard_bytes(root: Path, crawl: str) -> dict[str, bytes]:
    """The image shards of a crawl, marker timings left out."""
    out = {}
    for bucket in LAYOUT.bucket_keys():
        folder = root / paths.image_shards(crawl, bucket, LAYOUT)
        for p in sorted(folder.iterdir()):
            data = p.read_bytes()
            if p.name.endswith("_stats.json"):
                doc = orjson.loads(data)
                for timing in ("duration_s", "duration", "start_time", "end_time"):  # ours and img2dataset's
                    doc.pop(timing)
                data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
            out[f"{bucket}/{p.name}"] = data
    return out


@pytest.fixture
def platform(tmp_path):
    with running_platform(tmp_path, LAION_ASSETS_RETRY_DELAY_S="1") as running:
        yield running


@pytest.mark.timeout(1500)  # the whole platform lifecycle: two crawls, a kill, a retry, a re-filter, the UI
def test_the_platform_end_to_end(platform):
    root, env, dagster = platform
    mirror = root / "mirror"

    # A first crawl, materialized in-process into the same Postgres instance (the model registry observed first).
    instance, first = crawled(dagster, env, A, SMALL)
    assert all_materialized(instance, A)

    dagster.start()
    images = SlowImages(mirror / "www", delay_s=0.3)
    started = time.time()
    build_sample_crawl(mirror, SampleSettings(crawl=B, image_base_url=images.base, seed=5, **SMALL))

    # The sensor registers the new crawl; its backfill's download runs fetch images; one of them is killed.
    wait_for("the new crawl to be registered", lambda: B in instance.get_dynamic_partitions("crawls"), 120)
    wait_for("a download run to fetch images", lambda: len(images.client_ports) >= 3, 240)
    process = wait_for("the process of the download run", lambda: process_on_local_port(images.client_ports[-1]),
                       10, every=0.05)
    killed = kill_run_of(process)
    assert killed
    try:
        wait_for("every asset of the new crawl", lambda: all_materialized(instance, B), 600, every=2)
    except TimeoutError:
        raise AssertionError(dagster.logs()) from None

    # One backfill launched the work; the killed run failed and a retry of it finished the downloads. (Once the
    # first crawl's knn_index is in, reprocess_on_change may also launch knn_index_all, which no crawl's backfill
    # holds, as a backfill of its own: that one merges the indices, it does not do the crawls' work.)
    backfills = [b for b in instance.get_backfills() if set(b.asset_selection or []) != {dg.AssetKey("knn_index_all")}]
    assert [b.tags.get("laion_assets/trigger") for b in backfills] == ["new_crawls"]
    def runs_since() -> list[dg.DagsterRun]:
        return instance.get_runs(dg.RunsFilter(updated_after=datetime.fromtimestamp(started, tz=UTC)))

    def retries_of(runs: list[dg.DagsterRun]) -> list[dg.DagsterRun]:
        failed = {r.run_id for r in runs if r.status == dg.DagsterRunStatus.FAILURE}
        return [r for r in runs if r.tags.get("dagster/parent_run_id") in failed]

    # The last materialization lands a moment before its run records its end: wait for the retries to end.
    wait_for("the retried runs to end", lambda: all(r.is_finished for r in retries_of(runs_since())), 120)
    runs = runs_since()
    retries = retries_of(runs)
    assert retries and all(r.status == dg.DagsterRunStatus.SUCCESS for r in retries), [r.status for r in retries]

    # Byte-identical to an undisturbed run of the same crawl.
    reference = Graph(graph_resources(str(root / "reference"), mirror))
    reference.instance.add_dynamic_partitions("crawls", [B])
    reference.crawl(B, clip=False)
    assert shard_bytes(root / "data", B) == shard_bytes(root / "reference", B)

    # A stricter English threshold: clip_scores is re-filtered without rescoring, and what depends on it follows.
    changed = time.time()
    result = CliRunner().invoke(cli, ["models", "set", "--storage", env["LAION_ASSETS_STORAGE"], "--threshold-en",
                                      "0.99", "--note", "platform test"])
    assert result.exit_code == 0, result.output
    every_bucket = partitions_of(A, "clip_scores") | partitions_of(B, "clip_scores")

    def followed() -> bool:
        return all({m.partition for m in materializations(instance, a, changed)} == every_bucket
                   for a in ("clip_scores", "image_embeddings", "safety_scores", "watermark_scores"))

    try:
        wait_for("clip_scores and its dependants to re-run", followed, 600, every=2)
    except TimeoutError:
        raise AssertionError(dagster.logs()) from None
    refiltered = materializations(instance, "clip_scores", changed)
    assert all(m.metadata["refiltered_only"].value is True for m in refiltered)  # no image was scored again
    before = {m.partition: m.metadata["kept"].value for m in materializations(instance, "clip_scores")
              if m.partition in every_bucket and m not in refiltered}
    assert sum(m.metadata["kept"].value for m in refiltered) < sum(before.values())

    images.shutdown()
    check_ui(dagster.url, instance)


def check_ui(url: str, instance: dg.DagsterInstance) -> None:
    """In headless Chromium: every asset of the graph is materialized for both crawls (nothing missing or failed),
    a blocking check's result, and the ticks of the sensors that launched the work."""
    from laion_assets_tests.browser import page

    with page() as tab:
        tab.goto(f"{url}/assets")
        skip = tab.get_by_role("button", name="Skip")  # the community pop-up of the first visit
        skip.wait_for()
        skip.click()
        for asset in CRAWL_ASSETS:
            tab.goto(f"{url}/assets/{asset}?view=partitions")
            total = len(partitions_of(A, asset)) * 2
            tab.get_by_text(f"Materialized ({total})").wait_for()
            body = tab.inner_text("body")
            assert "Missing (0)" in body and "Failed (0)" in body, (asset, body[:2000])
            if asset != "wat_manifest":
                assert B in body, asset
        tab.goto(f"{url}/assets/image_shards?view=checks")
        tab.get_by_text("one_row_per_url").first.wait_for()
        assert "This is a blocking asset check." in tab.inner_text("body") or tab.get_by_text("Succeeded").count()
        tab.get_by_text("Passed").first.wait_for()
        # Why each run started: the backfill of the new crawl, and the automation that followed the new threshold.
        tab.goto(f"{url}/runs")
        tab.get_by_text("reprocess_on_change").first.wait_for()
        # The backfill page shows no tags; the runs feed filtered by the trigger tag lists the backfill with them.
        tab.goto(f"{url}/runs?q%5B0%5D=tag%3Alaion_assets%2Ftrigger%3Dnew_crawls")
        tab.get_by_text("laion_assets/trigger: new_crawls").first.wait_for()
        for sensor in ("new_crawls", "observe_models"):
            tab.goto(f"{url}/locations/laion_assets.definitions/sensors/{sensor}")
            tab.get_by_text("Latest tick").wait_for()
            tab.wait_for_timeout(1500)
            body = tab.inner_text("body")
            assert "Sensor has never run" not in body, (sensor, body[:1500])
