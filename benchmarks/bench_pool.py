"""Download worker pool: this tree's distributor against another revision's, side by side, on one URL list.

Written to decide between the hand-written pool (worker processes and a message queue, at 32be86c) and
`concurrent.futures.ProcessPoolExecutor` on the same forkserver context: `--baseline` names the revision whose
`laion_assets/core/download/distributor.py` is the other side (it runs on this tree's runner, fetcher and
writer, so only the pool differs).

Input: bench_download.py's LAION-size synthetic JPEGs (laion2B-en width and height quantiles), served by nginx
on 127.0.0.1 (installed with apt-get when missing). Each download runs in a fresh interpreter, as the CLI
would, with the CLI's settings: 256 px, border, JPEG, every politeness and safety check on, 127.0.0.1/32
allowed, a progress callback. Every run starts from an empty output folder. For each samples-per-shard
value (100: as bench_download; 10: many small shards, where per-shard costs would show) the two sides
alternate, and which goes first alternates too. Times are of `download(...)` inside its process (the
interpreter's start and imports, the same for both, are left out; the wall time with them is shown too),
with the CPU seconds of the whole process tree (less shaken by other load than wall time).

Printed per shard size: each side's median with its min..max, the ratio of medians and the median of the
ratios of the runs paired in time (the steadier figure on a shared machine), the load average before and
after. Both sides must report the same successes, and progress that adds up to every URL.

Usage: python benchmarks/bench_pool.py [--images 1000] [--runs 5] [--processes 2] [--samples-per-shard 100,10]
                                       [--baseline 32be86c]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work" / "pool"
BASELINE_MODULE = "pool_baseline"
CANDIDATE_MODULE = "laion_assets.core.download.distributor"


def one_download(module: str, urls: str, out: str, processes: int, per_shard: int) -> None:
    """In a fresh interpreter: one download with `module`'s download(); prints its figures as JSON."""
    import importlib

    from laion_assets.core.settings import DownloadSettings, FetchSettings, ResizeSettings
    from laion_assets.core.storage import Storage

    loaded = importlib.import_module(module)
    download = getattr(loaded, "run", None) or loaded.download  # the entry point was `download` before issue 16
    settings = DownloadSettings(samples_per_shard=per_shard, processes=processes,
                                resize=ResizeSettings(image_size=256, resize_mode="border", encode_format="jpg"),
                                fetch=FetchSettings(allow_networks=("127.0.0.1/32",)))
    seen = {"done": 0, "ok": 0}

    def progress(done: int, ok: int) -> None:
        seen["done"] += done
        seen["ok"] += ok

    start = time.perf_counter()
    report = download(urls, Storage(out), "", settings, progress=progress)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds(), "successes": report.statuses.get("success", 0),
                      "rows": report.rows, "shards": report.shards, "progress": seen["done"]}))


def cpu_seconds() -> float:
    """CPU time of this process and its children so far: the fork server's own, and its workers', which it
    has reaped by the time a download returns (both sides join their workers before returning)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children():
        t = child.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def baseline_dir(rev: str) -> Path:
    """The baseline's distributor as module `pool_baseline` in a folder of its own (on the workers' path too:
    the fork server takes the parent's sys.path)."""
    folder = WORK / f"baseline-{rev}"
    folder.mkdir(parents=True, exist_ok=True)
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:laion_assets/core/download/distributor.py"],
                            check=True, capture_output=True, text=True).stdout
    (folder / f"{BASELINE_MODULE}.py").write_text(source)
    return folder


def timed(side: str, module_dir: Path | None, module: str, urls: Path, out: Path, args: argparse.Namespace,
          per_shard: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--one", module, str(urls), str(out), str(args.processes), str(per_shard)]
    if module_dir is not None:
        cmd += ["--module-dir", str(module_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    if figures["progress"] != figures["rows"]:
        sys.exit(f"{side}: progress reported {figures['progress']} URLs of {figures['rows']}")
    return {**figures, "wall": wall}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})"


def compare(per_shard: int, args: argparse.Namespace, urls: Path, module_dir: Path) -> float:
    sides = {"hand-written": (module_dir, BASELINE_MODULE), "executor": (None, CANDIDATE_MODULE)}
    print(f"\n== {args.images} images, {args.processes} processes, {per_shard} samples per shard ==", flush=True)
    load_before = loadavg()
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.runs):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for side in order:
            runs[side].append(timed(side, *sides[side], urls, WORK / f"out-{side}", args, per_shard))
        print(f"run {i + 1}/{args.runs} ({' first, '.join(order)} second): "
              + ", ".join(f"{side} {runs[side][-1]['seconds']:.2f} s" for side in sides), flush=True)
    load_after = loadavg()
    seconds = {side: [r["seconds"] for r in runs[side]] for side in sides}
    walls = {side: [r["wall"] for r in runs[side]] for side in sides}
    cpu = {side: [r["cpu"] for r in runs[side]] for side in sides}
    ok = {side: {r["successes"] for r in runs[side]} for side in sides}
    shards = runs["executor"][0]["shards"]
    print(f"\n{shards} shards; load average {load_before} before, {load_after} after")
    for side in sides:
        print(f"{side:13} download() {spread(seconds[side])};  process wall {spread(walls[side])};"
              f"  CPU {spread(cpu[side])};  successes {sorted(ok[side])}")
    ratio = statistics.median(seconds["executor"]) / statistics.median(seconds["hand-written"])
    paired = statistics.median(e / h for e, h in zip(seconds["executor"], seconds["hand-written"], strict=True))
    cpu_ratio = statistics.median(cpu["executor"]) / statistics.median(cpu["hand-written"])
    print(f"ratio (executor / hand-written seconds): medians {ratio:.3f}, paired runs {paired:.3f};"
          f" CPU seconds, medians {cpu_ratio:.3f}")
    if ok["executor"] != ok["hand-written"] or len(ok["executor"]) != 1:
        print(f"WARNING: success counts differ ({ok})")
    return ratio


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one = argparse.ArgumentParser()
        one.add_argument("module")
        one.add_argument("urls")
        one.add_argument("out")
        one.add_argument("processes", type=int)
        one.add_argument("per_shard", type=int)
        one.add_argument("--module-dir")
        a = one.parse_args(sys.argv[2:])
        if a.module_dir:
            sys.path.insert(0, a.module_dir)
        one_download(a.module, a.urls, a.out, a.processes, a.per_shard)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples-per-shard", default="100,10", help="comma-separated; one comparison each")
    parser.add_argument("--baseline", default="32be86c", help="git revision of the other side's distributor.py")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_download import build_images, describe, ensure_nginx, free_port, start_nginx

    WORK.mkdir(parents=True, exist_ok=True)
    module_dir = baseline_dir(args.baseline)
    nginx = ensure_nginx()
    root = HERE / "work" / "download" / "www-laion"
    names, dims = build_images(root, args.images, "laion")
    for line in describe(root, names, dims, "laion"):
        print(f"  {line}")
    port = free_port()
    urls = WORK / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{n}" for n in names],
                             "caption": [f"synthetic photo {n}" for n in names]}), urls)
    server = start_nginx(nginx, root, port)
    try:
        ratios = {per: compare(per, args, urls, module_dir) for per in map(int, args.samples_per_shard.split(","))}
    finally:
        server.terminate()
        server.wait()
    print("\nratios (executor / hand-written seconds, medians): "
          + ", ".join(f"{per} per shard {ratio:.3f}" for per, ratio in ratios.items()))


if __name__ == "__main__":
    main()
