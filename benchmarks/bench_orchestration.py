"""Dagster's overhead on this project's kind of instance: runs per minute through the run queue for near-empty
partitions, and that overhead as a share of a production-sized partition's work (goal: under 5%).

A real instance in a temporary DAGSTER_HOME, built from the project's dagster.yaml: the QueuedRunCoordinator
(`concurrency.runs.max_concurrent_runs`, --concurrency, default 2 as on this 2-core machine), the `download` pool,
SQLite storage (or --postgres: a Debian PostgreSQL this script starts on 127.0.0.1 as the `postgres` user, with
dagster-postgres installed into the venv when missing), a `dagster api grpc` code server (how the Helm chart serves
user code), the DefaultRunLauncher (a fresh process per run) and a real `dagster-daemon run`.

The code location is written into the temporary folder: one asset partitioned like the project's bucket assets (the
dynamic `crawls` partitions x a static partition set of --buckets buckets, as laion_assets/partitions.py builds
them), in the `download` pool, with a code version and an asset check like `image_shards`, returning a
MaterializeResult whose small JSON record an IO manager writes atomically under a storage root, as the project's IO
manager writes a download's manifest. Its body does nothing (or sleeps --work-seconds), so what a run costs beyond
that is Dagster's. Jobs use the project's default executor, in_process (one process per run; --executor multiprocess
adds a process per step, as Dagster's default does). --import-project makes the location import
laion_assets.definitions too, so that every process pays the real code location's import time.

Runs go through the queue two ways (--mode): `runs` creates one run per partition and submits each with
`instance.submit_run` (what `dagster job launch` and the UI's launchpad do); `backfill` adds one asset backfill of
all the partitions (what the project's new_crawls and crawl_backfill sensors launch), which the daemon's
backfill loop (every 30 s) turns into queued runs. Each batch is timed from the first submission to the last run's
success: runs per minute, and per-run overhead = wall time x concurrency / runs - work seconds (the slot time a run
holds beyond its work, queue ticks included). A single run alone in the queue first gives the breakdown from the
event log (queued, run process start, step process start, step start, step, finish).

Production runs come from docs/scaling.md's reference crawl (90,000 WAT files, 512 chunks, 256 buckets: a chunk run
parses ~30M records, a bucket run downloads ~20M URLs and scores ~12M images) and its rates (all flags): the runs a
crawl launches (chunk runs; bucket runs, where a backfill puts a bucket's six steps), and the re-runs a model change
launches. The table prints overhead share = per-run overhead / work seconds, and the partitions per hour the
platform sustains at the measured overhead with --concurrency slots, next to the ceiling of near-empty runs.

Usage: python benchmarks/bench_orchestration.py [--runs 40] [--concurrency 2] [--buckets 256] [--work-seconds 0]
           [--mode runs|backfill|both] [--postgres] [--import-project] [--dequeue-interval S]
           [--executor in_process|multiprocess] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCATION, ASSET, JOB = "bench_orchestration", "bucket_work", "bench_job"
BATCH_TAG = "bench/batch"
GOAL_SHARE = 0.05

LOCATION_SOURCE = '''"""bench_orchestration's code location: one asset partitioned like laion_assets' bucket assets."""

import json
import os
import time

import dagster as dg

if __IMPORT_PROJECT__:
    import laion_assets.definitions  # noqa: F401  (the real location's import, paid by every process)

WORK_SECONDS = __WORK_SECONDS__
crawls = dg.DynamicPartitionsDefinition(name="crawls")
buckets = dg.MultiPartitionsDefinition(
    {"crawl": crawls, "bucket": dg.StaticPartitionsDefinition([f"{b:04d}" for b in range(__BUCKETS__)])})


class RecordIOManager(dg.ConfigurableIOManager):
    """Writes an asset's small JSON record under the storage root, atomically (as the project's IO manager)."""

    root: str

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        path = os.path.join(self.root, *context.asset_key.path, str(context.partition_key).replace("|", "/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".json.tmp", "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".json.tmp", path + ".json")

    def load_input(self, context: dg.InputContext):
        raise NotImplementedError("nothing reads it")


@dg.asset(partitions_def=buckets, pool="download", code_version="1", kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("one_row_per_url", asset="__ASSET__")])
def __ASSET__(context: dg.AssetExecutionContext):
    """Nothing, or a sleep of WORK_SECONDS: the rest of the run is Dagster's."""
    key = context.partition_key.keys_by_dimension
    start = time.perf_counter()
    if WORK_SECONDS:
        time.sleep(WORK_SECONDS)
    record = {"crawl": key["crawl"], "bucket": key["bucket"], "rows": 0}
    return dg.MaterializeResult(value=record, metadata={"dagster/row_count": 0, "work_s": time.perf_counter() - start},
                                check_results=[dg.AssetCheckResult(check_name="one_row_per_url", passed=True)])


defs = dg.Definitions(assets=[__ASSET__],
                      jobs=[dg.define_asset_job("__JOB__", selection=[__ASSET__], partitions_def=buckets)],
                      resources={"io_manager": RecordIOManager(root=__STORAGE__)},
                      executor=dg.__EXECUTOR___executor)
'''

# The phases of a run: each ends at the first event of its type in the run's event log and starts where the one
# before ended (the first at PIPELINE_ENQUEUED). Dagster 1.13 writes no event at dequeue: "queued" ends when the
# launcher starts the run, so it holds the dequeue tick's wait (and, in a batch, the wait for a free slot).
PHASES = [("queued", "PIPELINE_STARTING"), ("run process", "PIPELINE_START"), ("step process", "STEP_WORKER_STARTED"),
          ("to step", "STEP_START"), ("step", "STEP_SUCCESS"), ("finish", "PIPELINE_SUCCESS")]


@dataclass
class Stage:
    name: str
    derivation: str
    work_s: float


@dataclass
class Batch:
    name: str
    runs: int
    wall_s: float
    phases: dict[str, list[float]] = field(default_factory=dict)
    submit_s: float = 0.0  # creating and submitting the runs (or adding the backfill)
    first_run_s: float = 0.0  # first submission to the first run's creation (the backfill daemon's pickup)

    def per_run_overhead(self, concurrency: int, work_s: float) -> float:
        return self.wall_s * concurrency / self.runs - work_s

    @property
    def runs_per_minute(self) -> float:
        return self.runs / self.wall_s * 60


class Processes:
    """What this benchmark started, stopped on exit whatever happens (daemon, code server, PostgreSQL)."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stops: list[tuple[str, list[str]]] = []

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        self.children.append((name, proc))
        return proc

    def check(self) -> None:
        """Stops the benchmark when the daemon or the code server has exited under it."""
        for name, proc in self.children:
            if proc.poll() is not None:
                raise SystemExit(f"the {name} exited (status {proc.returncode}) in the middle of the benchmark; "
                                 f"its log is in the temporary folder (--keep keeps it)")

    def close(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the run processes it spawned too
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    print(f"  {name} did not stop in 20 s: killed", flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.children.clear()
        for name, cmd in reversed(self.stops):
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                print(f"  could not stop {name}: {' '.join(cmd)}", flush=True)
        self.stops.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"


# --- PostgreSQL ----------------------------------------------------------------------------------------------


def ensure_dagster_postgres() -> None:
    if importlib.util.find_spec("dagster_postgres"):
        return
    from importlib.metadata import version

    dagster = version("dagster")
    major, minor, patch = dagster.split(".")[:3]
    pin = f"dagster-postgres==0.{int(minor) + 16}.{patch}"  # libraries are 0.(minor+16): 1.13.27 -> 0.29.27
    print(f"installing {pin} (matching dagster {dagster})", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", pin, f"dagster=={dagster}"], check=True)


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        print("installing postgresql with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent


def start_postgres(tmp: Path, procs: Processes) -> tuple[dict, str]:
    """A PostgreSQL cluster in tmp/pg on a free port of 127.0.0.1, trusted locally: (dagster's postgres_db, its
    version)."""
    bindir = postgres_bin()
    pg = tmp / "pg"
    pg.mkdir()
    (pg / "sock").mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        user = pwd.getpwnam("postgres")
        tmp.chmod(0o755)
        for path in (pg, pg / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = pg / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-instructions"], check=True, stdout=subprocess.DEVNULL)
    options = f"-p {port} -k {pg / 'sock'} -c listen_addresses=127.0.0.1"
    procs.stops.append(("postgres", [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]))
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(pg / "server.log"), "-o", options,
                    "-w", "start"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                    "dagster"], check=True)
    pg_version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout
    db = {"username": "postgres", "password": "", "hostname": "127.0.0.1", "port": port, "db_name": "dagster",
          "scheme": "postgresql+psycopg2"}
    return db, pg_version.strip()


# --- the instance --------------------------------------------------------------------------------------------


def instance_config(args: argparse.Namespace, postgres_db: dict | None) -> dict:
    """The project's dagster.yaml with this benchmark's run limit, pool limit and storage."""
    import yaml

    config = yaml.safe_load((ROOT / "dagster.yaml").read_text()) or {}
    concurrency = config.setdefault("concurrency", {})
    concurrency.setdefault("runs", {})["max_concurrent_runs"] = args.concurrency
    pools = concurrency.setdefault("pools", {})
    pools["default_limit"] = max(args.concurrency, pools.get("default_limit", 1))  # runs, not pools, are the limit
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                                 "config": ({"dequeue_interval_seconds": args.dequeue_interval}
                                            if args.dequeue_interval else {})}
    config["telemetry"] = {"enabled": False}
    if postgres_db:
        config["storage"] = {"postgres": {"postgres_db": postgres_db}}
    return config


def write_location(args: argparse.Namespace, tmp: Path) -> Path:
    source = (LOCATION_SOURCE.replace("__IMPORT_PROJECT__", repr(bool(args.import_project)))
              .replace("__WORK_SECONDS__", repr(float(args.work_seconds))).replace("__BUCKETS__", str(args.buckets))
              .replace("__STORAGE__", repr(str(tmp / "storage"))).replace("__ASSET__", ASSET)
              .replace("__JOB__", JOB).replace("__EXECUTOR__", args.executor))
    path = tmp / "bench_location.py"
    path.write_text(source)
    return path


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            result = check()
            if result:
                return result
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def partition_keys(partitions_def, crawls: list[str], count: int) -> list[str]:
    buckets = next(d for d in partitions_def.partitions_defs if d.name == "bucket").partitions_def
    keys = [str(_multi_key(crawl, bucket)) for crawl in crawls for bucket in buckets.get_partition_keys()]
    return keys[:count]


def _multi_key(crawl: str, bucket: str):
    import dagster as dg

    return dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket})


# --- submitting and timing -----------------------------------------------------------------------------------


class Submitter:
    """Creates runs of the location's job and submits them to the queue, as `dagster job launch` does."""

    def __init__(self, instance, workspace_context, partitions_def) -> None:
        from dagster._core.definitions.selector import JobSubsetSelector

        self.instance = instance
        self.workspace_context = workspace_context
        self.partitions_def = partitions_def
        self.context = workspace_context.create_request_context()
        self.location = self.context.get_code_location(LOCATION)
        (self.repo,) = self.location.get_repositories().values()
        self.job = self.location.get_job(JobSubsetSelector(location_name=LOCATION, repository_name=self.repo.name,
                                                           job_name=JOB, op_selection=None))

    def submit(self, key: str, batch: str) -> str:
        plan = self.location.get_execution_plan(self.job, {}, step_keys_to_execute=None, known_state=None,
                                                instance=self.instance)
        tags = {**self.job.tags, **self.partitions_def.get_tags_for_partition_key(key), BATCH_TAG: batch}
        run = self.instance.create_run(
            job_name=JOB, run_id=None, run_config={}, resolved_op_selection=None, step_keys_to_execute=None,
            op_selection=None, status=None, root_run_id=None, parent_run_id=None, tags=tags,
            job_snapshot=self.job.job_snapshot, execution_plan_snapshot=plan.execution_plan_snapshot,
            parent_job_snapshot=self.job.parent_job_snapshot, remote_job_origin=self.job.get_remote_origin(),
            job_code_origin=self.job.get_python_origin(), asset_selection=None, asset_check_selection=None,
            asset_graph=self.repo.asset_graph)
        self.instance.submit_run(run.run_id, self.context)
        return run.run_id

    def backfill(self, keys: list[str], batch: str) -> str:
        import dagster as dg
        from dagster._core.execution.backfill import PartitionBackfill
        from dagster._core.utils import make_new_backfill_id

        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=make_new_backfill_id(), asset_graph=self.context.asset_graph, partition_names=keys,
            asset_selection=[dg.AssetKey(ASSET)], backfill_timestamp=time.time(), tags={BATCH_TAG: batch},
            dynamic_partitions_store=self.instance, all_partitions=False, title=f"bench_orchestration {batch}",
            description=None, run_config=None)
        self.instance.add_backfill(backfill)
        return backfill.backfill_id


def wait_for_batch(instance, batch: str, runs: int, timeout: float, procs: Processes, daemon_log: Path) -> list:
    """The batch's run records once all have succeeded; stops at the first failure."""
    from dagster import DagsterRunStatus, RunsFilter

    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        procs.check()
        records = instance.get_run_records(filters=RunsFilter(tags={BATCH_TAG: batch}))
        failed = [r for r in records if r.dagster_run.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)]
        if failed:
            run_id = failed[0].dagster_run.run_id
            errors = [getattr(e.dagster_event.event_specific_data, "error", None) or e.message
                      for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.is_failure]
            raise SystemExit(f"run {run_id} of {batch} failed: {errors[0] if errors else 'no failure event'}")
        done = sum(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records)
        if done != last and (done % 10 == 0 or done == runs):
            print(f"    {done}/{runs} runs done", flush=True)
            last = done
        if len(records) >= runs and done == len(records):
            return records
        time.sleep(0.2)
    tail = daemon_log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"{batch}: not all {runs} runs succeeded within {timeout:.0f} s\n{tail}")


def phases_of(instance, run_id: str) -> dict[str, float]:
    """Seconds between the run's successive lifecycle events (first occurrence of each)."""
    first: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        if entry.dagster_event is not None:
            first.setdefault(entry.dagster_event.event_type_value, entry.timestamp)
    out = {}
    previous = first.get("PIPELINE_ENQUEUED")
    for name, event in PHASES:
        if event in first and previous is not None:
            out[name] = first[event] - previous
            previous = first[event]
    return out


def run_batch(args, instance, submitter: Submitter, name: str, keys: list[str], procs: Processes,
              daemon_log: Path) -> Batch:
    batch = f"{name}-{int(time.time())}"
    start = time.time()
    if name == "backfill":
        print(f"  backfill: one asset backfill of {len(keys)} partitions", flush=True)
        submitter.backfill(keys, batch)
    else:
        print(f"  runs: {len(keys)} runs through instance.submit_run", flush=True)
        for key in keys:
            submitter.submit(key, batch)
    submit_s = time.time() - start
    timeout = 300 + len(keys) * (args.work_seconds + 60) / args.concurrency
    records = wait_for_batch(instance, batch, len(keys), timeout, procs, daemon_log)
    end = max(r.end_time for r in records)
    result = Batch(name, len(records), end - start, submit_s=submit_s,
                   first_run_s=min(r.create_timestamp.timestamp() for r in records) - start)
    for record in records:
        for phase, seconds in phases_of(instance, record.dagster_run.run_id).items():
            result.phases.setdefault(phase, []).append(seconds)
    if result.runs > 1:
        print(f"    {result.runs} runs in {result.wall_s:.1f} s: {result.runs_per_minute:.1f} runs/min, "
              f"{result.per_run_overhead(args.concurrency, args.work_seconds):.2f} s overhead per run", flush=True)
    return result


def import_seconds() -> tuple[float, float]:
    """Wall seconds of a fresh interpreter importing dagster, and laion_assets.definitions (median of 3)."""
    def timed(module: str) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return timed("dagster"), timed("laion_assets.definitions")


# --- report --------------------------------------------------------------------------------------------------


def production_stages(args: argparse.Namespace) -> list[Stage]:
    """Work seconds of the runs a production crawl launches, from docs/scaling.md's reference crawl and rates."""
    chunk_records = args.wat_files / args.chunks * args.records_per_wat
    urls = args.wat_files * args.records_per_wat * args.pairs_per_record * args.unique / args.buckets
    images = urls * args.success
    kept = images * args.kept
    download = urls / (args.download_rate * args.download_processes)
    b32, l14, wm = images / args.b32_rate, kept / args.l14_rate, kept / args.watermark_rate
    return [
        Stage("chunk run (candidate_pairs)", f"{chunk_records:,.0f} records / {args.parse_rate:,.0f} records/s",
              chunk_records / args.parse_rate),
        Stage("bucket run (backfill: dedup .. watermark)",
              f"download {urls:,.0f} URLs / ({args.download_rate:g} URLs/s x {args.download_processes} processes) "
              f"= {download:,.0f} s + B/32 {b32:,.0f} s + L/14 {l14:,.0f} s + watermark {wm:,.0f} s",
              download + b32 + l14 + wm),
        Stage("re-score run (new B/32 checkpoint)", f"B/32 {images:,.0f} images / {args.b32_rate:,.0f}/s "
              f"+ L/14 + watermark of {kept:,.0f} kept", b32 + l14 + wm),
        Stage("re-embed run (new L/14 checkpoint)", f"{kept:,.0f} kept / {args.l14_rate:,.0f}/s", l14),
        Stage("watermark run (new watermark model)", f"{kept:,.0f} kept / {args.watermark_rate:,.0f}/s", wm),
    ] + [Stage(name, "--stage", float(seconds)) for name, _, seconds in (x.partition("=") for x in args.stage)]


def print_report(args, batches: list[Batch], single: dict[str, float], imports: tuple[float, float] | None,
                 load: tuple[float, float]) -> None:
    c = args.concurrency
    alone = sum(single.values()) - args.work_seconds
    print("\nA run alone in the queue (seconds between its events):")
    print("  " + " | ".join(f"{k} {fmt_s(v)}" for k, v in single.items()) + f" | total {fmt_s(sum(single.values()))}")

    print(f"\nBatches ({c} runs at once; wall = first submission to last success; 1st run = first submission to "
          f"the first run's creation):")
    print(f"  {'mode':<9} {'runs':>4} {'submit s':>8} {'1st run s':>9} {'wall s':>7} {'runs/min':>8} "
          f"{'slot s/run':>10} {'overhead s/run':>14}   median s: " + " / ".join(n for n, _ in PHASES))
    for b in batches:
        medians = " / ".join(fmt_s(statistics.median(b.phases[n])) if n in b.phases else "-" for n, _ in PHASES)
        print(f"  {b.name:<9} {b.runs:>4} {b.submit_s:>8.1f} {b.first_run_s:>9.1f} {b.wall_s:>7.1f} "
              f"{b.runs_per_minute:>8.1f} {b.wall_s * c / b.runs:>10.2f} "
              f"{b.per_run_overhead(c, args.work_seconds):>14.2f}   {medians}")
    if imports:
        included = "included: --import-project" if args.import_project else "not included; --import-project adds it"
        print(f"  import in a fresh process: dagster {imports[0]:.2f} s, laion_assets.definitions {imports[1]:.2f} s: "
              f"the real location costs up to {imports[1] - imports[0]:.1f} s more in each of a run's processes "
              f"({included})")
    print(f"  load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after, on {os.cpu_count()} CPUs")

    print(f"\nProduction partitions: overhead = s/run beyond the work (alone: the run above; runs, backfill: the "
          f"batch's slot time per run), share = overhead / work, partitions/h = {c} slots x 3600 / (work + overhead)")
    overheads = [("alone", alone)] + [(b.name, b.per_run_overhead(c, args.work_seconds)) for b in batches]
    stages = production_stages(args)
    width = max(len(s.name) for s in stages)
    print(f"  {'stage':<{width}} {'work s':>6}  {'mode':<8} {'overhead s':>10} {'share':>6} {'partitions/h':>12}")
    worst: dict[bool, tuple[float, str]] = {True: (0.0, ""), False: (0.0, "")}
    for s in stages:
        crawl_run = not s.name.startswith(("re-", "watermark run"))
        for i, (name, overhead) in enumerate(overheads):
            share = overhead / s.work_s
            if name != "alone":
                worst[crawl_run] = max(worst[crawl_run], (share, f"{s.name}, {name}"))
            lead = f"{s.name:<{width}} {s.work_s:>6.0f}" if i == 0 else " " * (width + 7)
            print(f"  {lead}  {name:<8} {overhead:>10.1f} {share:>6.1%} {c * 3600 / (s.work_s + overhead):>12,.1f}")
    print("  work:")
    for s in stages:
        print(f"    {s.name}: {s.derivation}")
    ceilings = ", ".join(f"{b.name} {b.runs_per_minute * 60:,.0f}" for b in batches)
    print(f"  measured, {args.work_seconds:g} s of work per run, {c} slots: {ceilings} partitions/h"
          + (" (the platform's ceiling: near-empty partitions)" if args.work_seconds < 1 else ""))
    for crawl_run, label in ((True, "the runs a crawl launches"), (False, "re-runs after a model change")):
        share, where = worst[crawl_run]
        verdict = "PASS" if share < GOAL_SHARE else "FAIL"
        print(f"{'' if not crawl_run else chr(10)}Goal: overhead under {GOAL_SHARE:.0%} of the work, {label} "
              f"(batch overhead): {verdict} (worst {share:.1%}: {where})")


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, default=40, help="runs (partitions) per batch")
    p.add_argument("--concurrency", type=int, default=2, help="concurrency.runs.max_concurrent_runs")
    p.add_argument("--buckets", type=int, default=256, help="buckets per crawl in the partitions")
    p.add_argument("--work-seconds", type=float, default=0.0, help="seconds each partition's asset sleeps")
    p.add_argument("--mode", choices=["runs", "backfill", "both"], default="both",
                   help="submit runs one by one, launch one asset backfill, or both one after the other")
    p.add_argument("--postgres", action="store_true", help="PostgreSQL storage (started here) instead of SQLite")
    p.add_argument("--import-project", action="store_true",
                   help="the location also imports laion_assets.definitions (the real import cost per process)")
    p.add_argument("--dequeue-interval", type=int, default=None,
                   help="QueuedRunCoordinator dequeue_interval_seconds (default: Dagster's, 5 s)")
    p.add_argument("--executor", choices=["in_process", "multiprocess"], default="in_process",
                   help="the jobs' executor (the project's default is in_process; multiprocess adds a step process)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (instance, logs)")
    g = p.add_argument_group("production partitions (docs/scaling.md's reference crawl, CC-MAIN-2023-50)")
    g.add_argument("--wat-files", type=int, default=90_000, help="WAT files of the crawl")
    g.add_argument("--records-per-wat", type=int, default=170_000, help="records per WAT file")
    g.add_argument("--chunks", type=int, default=512, help="candidate_pairs chunks per crawl")
    g.add_argument("--parse-rate", type=float, default=10_000, help="WAT records/s of one extraction core")
    g.add_argument("--pairs-per-record", type=float, default=1.656, help="candidate pairs per WAT record")
    g.add_argument("--unique", type=float, default=0.20, help="unique URLs per candidate pair")
    g.add_argument("--download-rate", type=float, default=30, help="URLs/s per download process (one core)")
    g.add_argument("--download-processes", type=int, default=16, help="download processes per bucket step")
    g.add_argument("--success", type=float, default=0.60, help="stored images per unique URL")
    g.add_argument("--kept", type=float, default=0.10, help="kept by the CLIP threshold per stored image")
    g.add_argument("--b32-rate", type=float, default=10_000, help="ViT-B/32 scoring images/s per H100")
    g.add_argument("--l14-rate", type=float, default=2_500, help="ViT-L/14 embedding images/s per H100")
    g.add_argument("--watermark-rate", type=float, default=10_000, help="watermark classifier images/s per H100")
    g.add_argument("--stage", action="append", default=[], metavar="NAME=SECONDS",
                   help="another run's work seconds (repeatable)")
    return p.parse_args(argv)


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM cleans up as Ctrl-C does


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    procs = Processes()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    workspace_context = instance = None
    try:
        if args.postgres:
            ensure_dagster_postgres()
        import dagster as dg
        import yaml
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import GrpcServerTarget
        from dagster._grpc.client import DagsterGrpcClient

        home = tmp / "home"
        home.mkdir()
        postgres_db, pg_version = start_postgres(tmp, procs) if args.postgres else (None, "")
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(args, postgres_db)))
        location = write_location(args, tmp)
        env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        os.environ["DAGSTER_HOME"] = str(home)
        instance = dg.DagsterInstance.get()  # creates the schema before the daemon and code server connect
        storage = f"PostgreSQL ({pg_version})" if args.postgres else "SQLite"
        coordinator = instance.run_coordinator
        print(f"instance: {tmp}  storage {storage}, {type(coordinator).__name__} max_concurrent_runs "
              f"{args.concurrency}, dequeue every {coordinator.dequeue_interval_seconds} s, "
              f"{type(instance.run_launcher).__name__}", flush=True)
        print(f"location: {ASSET} on crawls x {args.buckets} buckets, pool download, "
              f"{args.work_seconds:g} s of work per run" + (", imports laion_assets" if args.import_project else ""),
              flush=True)

        bin_dir = Path(sys.executable).parent
        port = free_port()
        grpc_log, daemon_log = tmp / "code-server.log", tmp / "daemon.log"
        grpc = procs.start("code server", [str(bin_dir / "dagster"), "api", "grpc", "-f", str(location), "-h",
                                           "127.0.0.1", "-p", str(port), "--location-name", LOCATION], grpc_log, env,
                           tmp)
        (tmp / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [
            {"grpc_server": {"host": "127.0.0.1", "port": port, "location_name": LOCATION}}]}))

        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        wait_for("the code server", lambda: client.ping("ok"), 120, grpc, grpc_log)
        workspace_context = WorkspaceProcessContext(instance, GrpcServerTarget(
            host="127.0.0.1", port=port, socket=None, location_name=LOCATION))
        daemon = procs.start("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", str(tmp / "workspace.yaml")],
                             daemon_log, env, tmp)
        wanted = {"QUEUED_RUN_COORDINATOR", "BACKFILL"}
        wait_for("dagster-daemon", lambda: wanted <= set(instance.get_daemon_heartbeats()), 120, daemon, daemon_log)

        partitions_def = dg.MultiPartitionsDefinition({
            "crawl": dg.DynamicPartitionsDefinition(name="crawls"),
            "bucket": dg.StaticPartitionsDefinition([f"{b:04d}" for b in range(args.buckets)])})
        per_crawl = -(-args.runs // args.buckets)
        modes = ["runs", "backfill"] if args.mode == "both" else [args.mode]
        crawls = {mode: [f"CC-MAIN-{2100 + i}-{j + 1:02d}" for j in range(per_crawl)] for i, mode in enumerate(modes)}
        instance.add_dynamic_partitions("crawls", ["CC-MAIN-2099-01", *(c for cs in crawls.values() for c in cs)])
        submitter = Submitter(instance, workspace_context, partitions_def)

        print("a single run (also the warm-up)", flush=True)
        single = run_batch(args, instance, submitter, "runs",
                           partition_keys(partitions_def, ["CC-MAIN-2099-01"], 1), procs, daemon_log)
        single_phases = {k: v[0] for k, v in single.phases.items()}
        batches = []
        for mode in modes:
            batches.append(run_batch(args, instance, submitter, mode,
                                     partition_keys(partitions_def, crawls[mode], args.runs), procs, daemon_log))
        imports = import_seconds()
        print_report(args, batches, single_phases, imports, (load_before, os.getloadavg()[0]))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping what was started", flush=True)
        raise SystemExit(130) from None
    finally:
        with contextlib.suppress(Exception):
            if workspace_context is not None:
                workspace_context.__exit__(None, None, None)
            if instance is not None:
                instance.dispose()
        procs.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
