"""Download speed: `laion-assets download` against img2dataset 1.47, side by side, on one URL list.

Input: about 1,000 synthetic photo-like JPEGs (random sizes from 320x240 to 1280x720, noisy, so they
compress like photos) served by nginx on 127.0.0.1. Both tools get the same Parquet URL list and the same
settings: 256 px, border, JPEG, webdataset output, 2 processes, 100 samples per shard (so that both have
shards for both processes). Runs alternate between the tools; the median wall time of each gives images
per second and the ratio. Successes must be identical.

Ours runs with every politeness and safety check on (robots.txt per host, X-Robots-Tag, the address guard
with 127.0.0.1/32 allowed, byte cap, deadline, pixel budget, sha256 and phash per image). img2dataset
checks X-Robots-Tag only.

img2dataset gets its own virtual environment under benchmarks/work/ (its pins clash with ours); nginx is
installed with apt-get when it is missing.

Usage: python benchmarks/bench_download.py [--images 1000] [--runs 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.synthetic import jpeg_bytes, random_scene, render

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "download"
PEER_VENV = HERE / "work" / "i2d-venv"

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


def build_images(root: Path, count: int) -> list[str]:
    """Deterministic photo-like JPEGs; reused when already there."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    names = []
    for i in range(count):
        w = rng.randint(320, 1280)
        h = rng.randint(240, 720)
        scene = random_scene(rng)
        name = f"{i:05d}.jpg"
        path = root / name
        if not path.exists():
            path.write_bytes(jpeg_bytes(render(scene, (w, h), seed=i)))
        names.append(name)
    return names


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


def run(cmd: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    img2dataset = ensure_peer()
    nginx = ensure_nginx()
    root = WORK / "www"
    names = build_images(root, args.images)
    port = free_port()
    urls = WORK / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{n}" for n in names],
                             "caption": [f"synthetic photo {n}" for n in names]}), urls)
    ours_bin = shutil.which("laion-assets", path=str(Path(sys.executable).parent)) or "laion-assets"
    common = dict(size="256", shard=str(args.samples_per_shard), procs=str(args.processes))
    peer_out, ours_out = WORK / "out-img2dataset", WORK / "out-ours"
    peer_cmd = [str(img2dataset), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
                "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(peer_out),
                "--processes_count", common["procs"], "--image_size", common["size"], "--resize_mode", "border",
                "--encode_format", "jpg", "--number_sample_per_shard", common["shard"], "--enable_wandb", "False"]
    ours_cmd = [ours_bin, "download", str(urls), "--output-dir", str(ours_out), "--processes", common["procs"],
                "--image-size", common["size"], "--resize-mode", "border", "--encode-format", "jpg",
                "--samples-per-shard", common["shard"], "--allow-network", "127.0.0.1/32", "--quiet"]
    server = start_nginx(nginx, root, port)
    try:
        times: dict[str, list[float]] = {"img2dataset": [], "ours": []}
        for i in range(args.runs):
            times["img2dataset"].append(run(peer_cmd, peer_out))
            times["ours"].append(run(ours_cmd, ours_out))
            print(f"run {i + 1}/{args.runs}: img2dataset {times['img2dataset'][-1]:.2f} s,"
                  f" ours {times['ours'][-1]:.2f} s", flush=True)
    finally:
        server.terminate()
        server.wait()
    peer_ok, ours_ok = successes(peer_out), successes(ours_out)
    peer_s, ours_s = statistics.median(times["img2dataset"]), statistics.median(times["ours"])
    print()
    print(f"{args.images} images, {args.processes} processes, 256 px border JPEG, webdataset, nginx on 127.0.0.1")
    print(f"img2dataset 1.47:       median {peer_s:.2f} s  {peer_ok / peer_s:7.1f} images/s  ({peer_ok} ok)")
    print(f"laion-assets download:  median {ours_s:.2f} s  {ours_ok / ours_s:7.1f} images/s  ({ours_ok} ok)")
    print(f"ratio (ours / img2dataset images per second): {(ours_ok / ours_s) / (peer_ok / peer_s):.2f}x")
    if peer_ok != ours_ok:
        print(f"WARNING: success counts differ ({peer_ok} vs {ours_ok})")


if __name__ == "__main__":
    main()
