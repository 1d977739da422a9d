"""Download speed: `laion-assets download` against img2dataset 1.47, side by side, on one URL list.

Input: about 1,000 synthetic photo-like JPEGs (noisy, so they compress and decode like photos) served by nginx
on 127.0.0.1, in one of two size distributions (--sizes):

* laion (default): widths and heights follow the quantiles LAION-5B's announcement post publishes for
  laion2B-en (https://laion.ai/blog/laion-5b/, "Dataset Statistics", quantiles 0.05 to 0.95 in steps of
  0.05; median 340 x 320, 5%..95% 132..1050 wide and 125..1014 high). Each side is drawn by inverse
  transform through a piecewise log-linear quantile function over those 19 points; below 5% and above 95%
  the outermost segment is continued (so about 109..132 and 1050..1148 px wide; the real tails are longer,
  which makes this slightly kind to the largest images), then clamped to 32..4096 px. Width and height
  share one draw, as the sides of photos go together, plus a small independent jitter per side for aspect
  ratios: a Gaussian copula with correlation 0.95 between the two sides' normal scores, so each side keeps
  its published marginal exactly. With 0.95 the share of images with both sides over 256, 512 and 1024 px
  comes out at about 58%, 21% and 3.5% against the post's 57%, 21% and 3.3% (1324M, 488M and 76M of 2.32B),
  and aspect ratios run from about 0.7 to 1.8 (5%..95%). The shared draw walks the golden-ratio sequence
  rather than a random one so that 1,000 images already sit close to the published quantiles (their median
  is 338 x 316); the jitter is seeded.
* fixed: uniform random sizes from 320x240 to 1280x720, as this benchmark used before.
* both: the whole comparison for each, one after the other, with both result blocks and ratios.

Images are seeded and deterministic (the first N of a larger set are the same images) and kept in
benchmarks/work/download/www-laion/ and www-fixed/ for reuse; their names carry their sizes. The output
shows each distribution's median and 5%/95% widths and heights as generated.

Both tools get the same Parquet URL list and the same settings: 256 px, border, JPEG, webdataset output,
2 processes, 100 samples per shard (so that both have shards for both processes). Runs alternate between
the tools; the median wall time of each gives images per second and the ratio. Successes must be identical.

Ours runs with every politeness and safety check on (robots.txt per host, X-Robots-Tag, the address guard
with 127.0.0.1/32 allowed, byte cap, deadline, pixel budget, sha256 and phash per image). img2dataset
checks X-Robots-Tag only.

img2dataset gets its own virtual environment under benchmarks/work/ (its pins clash with ours); nginx is
installed with apt-get when it is missing. pip leaves img2dataset byte-compiled; our editable install is not (and
with PYTHONDONTWRITEBYTECODE, as here, never would be), so the benchmark byte-compiles laion_assets first: both
tools start from compiled bytecode, as a wheel install leaves them (otherwise ours compiles its modules in every
run, about 25 ms in each of the CLI's process and the fork server).

--input-format (txt, csv, tsv, json, jsonl, parquet, each also .gz; default parquet) writes the list in that
format for both tools; --save-additional-columns uid gives the list a uid column both tools copy to their rows
(ours always with min_image_bytes 0, img2dataset's keep-everything default, so that successes can match).

--dns flaky measures ours alone against itself: the same images under 100 host names (h000.test ...), resolved by
a name server the benchmark starts on 127.0.0.1 (`--nameserver`), once clean and once flaky: the first query of
every name and type is answered SERVFAIL, and a fifth of the others (chosen by a hash of name, type and count) are
answered 2 s late. Runs alternate; it prints successes and median times of both and their ratios (goal: at least
99% of the clean run's successes in at most 1.3x its time). img2dataset is not run: it can only use the system's
resolver.

Usage: python benchmarks/bench_download.py [--sizes laion|fixed|both] [--images 1000] [--runs 3] [--processes 2]
       [--input-format tsv.gz] [--save-additional-columns uid]
       python benchmarks/bench_download.py --dns flaky [--images 1000] [--runs 3] [--hosts 100]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import csv
import gzip
import io
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.offline.dns_server import Action, LoopbackDns
from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "download"
PEER_VENV = HERE / "work" / "i2d-venv"

# laion2B-en width and height quantiles at 0.05, 0.10, ..., 0.95 (https://laion.ai/blog/laion-5b/).
LAION_P = [round(0.05 * (i + 1), 2) for i in range(19)]
LAION_WIDTH = [132, 160, 180, 210, 225, 240, 262, 300, 309, 340, 400, 450, 480, 512, 600, 656, 760, 960, 1050]
LAION_HEIGHT = [125, 150, 166, 188, 208, 225, 250, 270, 300, 320, 350, 380, 418, 470, 500, 600, 672, 800, 1014]
# Shares of laion2B-en with both sides over 256, 512 and 1024 px: 1324M, 488M and 76M of 2.32B.
LAION_BOTH_OVER = {256: 1324 / 2320, 512: 488 / 2320, 1024: 76 / 2320}
SIDE_CORRELATION = 0.95  # between the normal scores of width and height; see the module docstring
MIN_SIDE, MAX_SIDE = 32, 4096
GOLDEN = (math.sqrt(5) - 1) / 2

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    types {{ image/jpeg jpg; text/plain txt; }}
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / "bin" / "img2dataset").exists():
        print("creating img2dataset's virtual environment (img2dataset 1.47.0) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "img2dataset==1.47.0"], check=True)
    return PEER_VENV / "bin" / "img2dataset"


def ensure_nginx() -> str:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        print("installing nginx with apt-get ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=True, capture_output=True)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return nginx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_linear_quantile(values: list[int], u: float) -> float:
    """Inverse CDF through (LAION_P[i], values[i]), linear in log size; the end segments are continued."""
    i = min(max(int((u - LAION_P[0]) / 0.05), 0), len(LAION_P) - 2)
    t = (u - LAION_P[i]) / (LAION_P[i + 1] - LAION_P[i])
    return math.exp(math.log(values[i]) + t * (math.log(values[i + 1]) - math.log(values[i])))


def laion_size(index: int, rng: random.Random) -> tuple[int, int]:
    """Image `index`'s (width, height) from laion2B-en's quantiles: a shared draw plus seeded jitter per side.

    The shared draw is the golden-ratio sequence (0.5 + index * 0.618...) mod 1, so that any first N images
    cover the quantiles evenly instead of by chance; the jitter comes from `rng`.
    """
    normal = statistics.NormalDist()
    shared = normal.inv_cdf((0.5 + index * GOLDEN) % 1.0)
    jitter = math.sqrt(1.0 - SIDE_CORRELATION**2)
    u_w = normal.cdf(SIDE_CORRELATION * shared + jitter * rng.gauss(0.0, 1.0))
    u_h = normal.cdf(SIDE_CORRELATION * shared + jitter * rng.gauss(0.0, 1.0))
    w = round(log_linear_quantile(LAION_WIDTH, u_w))
    h = round(log_linear_quantile(LAION_HEIGHT, u_h))
    return min(max(w, MIN_SIDE), MAX_SIDE), min(max(h, MIN_SIDE), MAX_SIDE)


def build_images(root: Path, count: int, sizes: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Deterministic photo-like JPEGs of the chosen size distribution; reused when already there."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234 if sizes == "fixed" else 5_850_000_000)
    names, dims = [], []
    made = 0
    for i in range(count):
        if sizes == "fixed":
            w, h = rng.randint(320, 1280), rng.randint(240, 720)
        else:
            w, h = laion_size(i, rng)
        scene = random_scene(rng)
        name = f"{i:05d}-{w}x{h}.jpg"
        path = root / name
        if not path.exists():
            if made == 0:
                print(f"  generating images in {root} ...", flush=True)
            path.write_bytes(jpeg_bytes(render(scene, (w, h), seed=i)))
            made += 1
        names.append(name)
        dims.append((w, h))
    return names, dims


def describe(root: Path, names: list[str], dims: list[tuple[int, int]], sizes: str) -> list[str]:
    """What was measured: the generated sizes' median and 5%/95%, bytes, and joint shares."""
    def q(values: list[int]) -> str:
        cuts = statistics.quantiles(values, n=20, method="inclusive")
        return f"median {cuts[9]:.0f} (5% {cuts[0]:.0f}, 95% {cuts[18]:.0f})"

    widths, heights = [w for w, _ in dims], [h for _, h in dims]
    kib = statistics.mean((root / n).stat().st_size for n in names) / 1024
    both = {t: sum(1 for w, h in dims if w > t and h > t) / len(dims) for t in LAION_BOTH_OVER}
    shares = "/".join(f"{100 * s:.1f}%" for s in both.values())
    published = "/".join(f"{100 * s:.1f}%" for s in LAION_BOTH_OVER.values())
    lines = [f"width  {q(widths)}", f"height {q(heights)}",
             f"both sides over 256/512/1024 px: {shares}" + (f" (laion2B-en: {published})" if sizes == "laion" else ""),
             f"mean JPEG {kib:.0f} KiB, {sum(w * h for w, h in dims) / len(dims) / 1e6:.2f} Mpx"]
    return lines


def start_nginx(nginx: str, root: Path, port: int) -> subprocess.Popen:
    (WORK / "tmp").mkdir(parents=True, exist_ok=True)
    conf = WORK / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=WORK, port=port, root=root))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(WORK)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"nginx did not start; see {WORK / 'nginx-error.log'}")


def successes(folder: Path) -> int:
    tables = [pq.read_table(p, columns=["status"]) for p in sorted(folder.glob("*.parquet"))]
    return sum(t["status"].to_pylist().count("success") for t in tables)


CPU_S: list[float] = []  # CPU seconds (user + system, all its processes) of each run(), in order


def run(cmd: list[str], out: Path) -> float:
    """Wall seconds of one command; its CPU seconds are appended to CPU_S (on a machine shared with other work,
    CPU time is the steadier measure of what a tool costs).

    CPU time is read from every process of the command's tree every 20 ms (psutil), the last reading of each
    kept: rusage would miss a forkserver's workers, which nobody waits for. A process's last 20 ms may be missed.
    """
    shutil.rmtree(out, ignore_errors=True)
    seen: dict[int, float] = {}
    start = time.perf_counter()
    with open(WORK / "run.stderr", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        CPU_S.append(sum(seen.values()))
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{cmd[0]} failed:\n{err.read()[-3000:]}")
    return seconds


def write_url_list(path: Path, fmt: str, rows: list[dict[str, str]]) -> None:
    """The same rows in any input format both tools read (json: one array, as img2dataset's pandas reads it)."""
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data = sink.getvalue().to_pybytes()
    elif base == "txt":
        data = "".join(r["url"] + "\n" for r in rows).encode()
    elif base in ("csv", "tsv"):
        text = io.StringIO()
        writer = csv.DictWriter(text, list(rows[0]), delimiter="," if base == "csv" else "\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
    elif base == "json":
        data = json.dumps(rows).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)


def compare(sizes: str, args: argparse.Namespace, img2dataset: Path, nginx: str) -> float:
    """The whole side-by-side run on one size distribution; prints its block and returns the ratio."""
    root = WORK / f"www-{sizes}"
    title = "laion2B-en quantiles" if sizes == "laion" else "uniform 320x240..1280x720"
    print(f"\n== sizes: {sizes} ({title}), {args.images} images ==", flush=True)
    names, dims = build_images(root, args.images, sizes)
    for line in describe(root, names, dims, sizes):
        print(f"  {line}")
    port = free_port()
    fmt, extra = args.input_format, args.save_additional_columns
    urls = WORK / f"urls-{sizes}.{fmt}"
    write_url_list(urls, fmt, [{"url": f"http://127.0.0.1:{port}/{n}", "caption": f"synthetic photo {n}",
                                **{c: f"{c}-{i:08d}" for c in extra}} for i, n in enumerate(names)])
    ours_bin = shutil.which("laion-assets", path=str(Path(sys.executable).parent)) or "laion-assets"
    common = dict(size="256", shard=str(args.samples_per_shard), procs=str(args.processes))
    peer_out, ours_out = WORK / "out-img2dataset", WORK / "out-ours"
    peer_cmd = [str(img2dataset), "--url_list", str(urls), "--input_format", fmt, "--url_col", "url",
                "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(peer_out),
                "--processes_count", common["procs"], "--image_size", common["size"], "--resize_mode", "border",
                "--encode_format", "jpg", "--number_sample_per_shard", common["shard"], "--enable_wandb", "False"]
    ours_cmd = [ours_bin, "download", str(urls), "--output-dir", str(ours_out), "--processes", common["procs"],
                "--image-size", common["size"], "--resize-mode", "border", "--encode-format", "jpg",
                "--samples-per-shard", common["shard"], "--allow-network", "127.0.0.1/32", "--quiet"]
    # img2dataset keeps every body; our default drops those under 5 KB (LAION's rule): the same here.
    ours_cmd += ["--min-image-bytes", "0", "--input-format", fmt]
    if extra:
        peer_cmd += ["--save_additional_columns", json.dumps(list(extra))]
        ours_cmd += [a for c in extra for a in ("--save-additional-columns", c)]
    server = start_nginx(nginx, root, port)
    try:
        times: dict[str, list[float]] = {"img2dataset": [], "ours": []}
        cpu: dict[str, list[float]] = {"img2dataset": [], "ours": []}
        for i in range(args.runs):
            times["img2dataset"].append(run(peer_cmd, peer_out))
            cpu["img2dataset"].append(CPU_S[-1])
            times["ours"].append(run(ours_cmd, ours_out))
            cpu["ours"].append(CPU_S[-1])
            print(f"run {i + 1}/{args.runs}: img2dataset {times['img2dataset'][-1]:.2f} s"
                  f" ({cpu['img2dataset'][-1]:.1f} CPU s), ours {times['ours'][-1]:.2f} s"
                  f" ({cpu['ours'][-1]:.1f} CPU s)", flush=True)
    finally:
        server.terminate()
        server.wait()
    peer_ok, ours_ok = successes(peer_out), successes(ours_out)
    peer_s, ours_s = statistics.median(times["img2dataset"]), statistics.median(times["ours"])
    ratio = (ours_ok / ours_s) / (peer_ok / peer_s)
    print()
    print(f"{len(names)} images ({sizes} sizes), {args.processes} processes, 256 px border JPEG, webdataset,"
          f" nginx on 127.0.0.1")
    print(f"img2dataset 1.47:       median {peer_s:.2f} s  {peer_ok / peer_s:7.1f} images/s  ({peer_ok} ok)")
    print(f"laion-assets download:  median {ours_s:.2f} s  {ours_ok / ours_s:7.1f} images/s  ({ours_ok} ok)")
    print(f"ratio (ours / img2dataset images per second): {ratio:.2f}x")
    peer_cpu, ours_cpu = statistics.median(cpu["img2dataset"]), statistics.median(cpu["ours"])
    print(f"CPU seconds (median, all processes): img2dataset {peer_cpu:.1f}, ours {ours_cpu:.1f};"
          f" images per CPU second ratio {(ours_ok / ours_cpu) / (peer_ok / peer_cpu):.2f}x"
          f" (load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    if peer_ok != ours_ok:
        print(f"WARNING: success counts differ ({peer_ok} vs {ours_ok})")
    return ratio


def flaky(name: str, qtype: int, nth: int) -> Action:
    """The flaky resolver: the first query of each name and type fails, a fifth of the others answer 2 s late."""
    if nth == 1:
        return Action("servfail")
    if zlib.crc32(f"{name}/{qtype}/{nth}".encode()) % 5 == 0:
        return Action("answer", 2.0)
    return Action()


def compare_dns(args: argparse.Namespace, nginx: str) -> None:
    """Ours through a clean and a flaky resolver, alternating, on the same images under `args.hosts` names."""
    root = WORK / "www-laion"
    print(f"\n== dns: clean vs flaky resolver, {args.images} images, {args.hosts} host names ==", flush=True)
    names, _ = build_images(root, args.images, "laion")
    port = free_port()
    hosts = [f"h{i:03d}.test" for i in range(args.hosts)]
    urls = WORK / "urls-dns.parquet"
    pq.write_table(pa.table({"url": [f"http://{hosts[i % len(hosts)]}:{port}/{n}" for i, n in enumerate(names)],
                             "caption": [f"synthetic photo {n}" for n in names]}), urls)
    ours_bin = shutil.which("laion-assets", path=str(Path(sys.executable).parent)) or "laion-assets"
    out = WORK / "out-ours-dns"
    servers = {"clean": LoopbackDns({h: ["127.0.0.1"] for h in hosts}),
               "flaky": LoopbackDns({h: ["127.0.0.1"] for h in hosts}, behave=flaky)}
    server = start_nginx(nginx, root, port)
    times: dict[str, list[float]] = {"clean": [], "flaky": []}
    ok: dict[str, list[int]] = {"clean": [], "flaky": []}
    try:
        for i in range(args.runs):
            for kind, dns in servers.items():
                dns.reset()  # every run meets the flaky resolver's first failures afresh
                cmd = [ours_bin, "download", str(urls), "--output-dir", str(out), "--processes", str(args.processes),
                       "--image-size", "256", "--resize-mode", "border", "--encode-format", "jpg",
                       "--samples-per-shard", str(args.samples_per_shard), "--allow-network", "127.0.0.1/32",
                       "--nameserver", dns.address, "--quiet", "--min-image-bytes", "0"]  # as compare()
                times[kind].append(run(cmd, out))
                ok[kind].append(successes(out))
            print(f"run {i + 1}/{args.runs}: clean {times['clean'][-1]:.2f} s ({ok['clean'][-1]} ok),"
                  f" flaky {times['flaky'][-1]:.2f} s ({ok['flaky'][-1]} ok)", flush=True)
    finally:
        server.terminate()
        server.wait()
        for dns in servers.values():
            dns.close()
    clean_s, flaky_s = statistics.median(times["clean"]), statistics.median(times["flaky"])
    clean_ok, flaky_ok = min(ok["clean"]), min(ok["flaky"])
    print()
    print(f"{len(names)} images on {len(hosts)} host names, {args.processes} processes, nginx on 127.0.0.1")
    print(f"clean resolver:  median {clean_s:.2f} s  {clean_ok} ok (fewest of {args.runs} runs)")
    print(f"flaky resolver:  median {flaky_s:.2f} s  {flaky_ok} ok (fewest of {args.runs} runs)")
    print(f"successes {100 * flaky_ok / max(clean_ok, 1):.1f}% of clean (goal >= 99%),"
          f" time {flaky_s / clean_s:.2f}x clean (goal <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=["laion", "fixed", "both"], default="laion",
                        help="image size distribution: laion2B-en's quantiles, the old uniform one, or both")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--input-format", default="parquet", help="the URL list's format, for both tools")
    parser.add_argument("--save-additional-columns", action="append", default=[],
                        help="a column of the list both tools keep in their rows (repeatable)")
    parser.add_argument("--dns", choices=["flaky"], default=None,
                        help="instead of the comparison: ours through a clean and a flaky resolver")
    parser.add_argument("--hosts", type=int, default=100, help="host names of the --dns run")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    compileall.compile_dir(HERE.parent / "laion_assets", quiet=1)  # see the docstring: as pip leaves the peer's
    if args.dns:
        compare_dns(args, ensure_nginx())
        return
    img2dataset = ensure_peer()
    nginx = ensure_nginx()
    ratios = {sizes: compare(sizes, args, img2dataset, nginx)
              for sizes in (["laion", "fixed"] if args.sizes == "both" else [args.sizes])}
    if len(ratios) > 1:
        print("\nratios (ours / img2dataset images per second): "
              + ", ".join(f"{sizes} sizes {ratio:.2f}x" for sizes, ratio in ratios.items()))


if __name__ == "__main__":
    main()
