"""Pair extraction speed: `laion-assets extract` against cc2dataset's `process_wat` + gcld3, side by side.

Input: the real 501-record WAT excerpt from ../shared/realdata, its gzip members replicated to about
20,000 records. Each side runs as a whole process pinned to one core (taskset), several times,
alternating; the median wall time gives records per second and the ratio.

The peer (cc2dataset 1.5.0, which imports pyspark at import time) gets its own virtual environment
under benchmarks/work/, never in the project's dependencies. Its recipe is cc2dataset's own
`process_wat(path, "image")` (FastWARC, simdjson, urljoin) followed by CLD3 on each pair's alt text.
Ours does at least that work: the same resolution and filtering rules plus text repair, normalization,
URL normalization, language on every kept pair, and writes a Parquet file.

Usage: python benchmarks/bench_extract.py [--replicas 40] [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
REALDATA = HERE.parent.parent / "shared" / "realdata"
EXCERPT = REALDATA / "CC-MAIN-2016-40-00000.first501.warc.wat.gz"
PEER_VENV = WORK / "peer-venv"

PEER_SCRIPT = """
import sys
import gcld3
from cc2dataset import process_wat

detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
pairs = 0
for uid, url, alt, cc_filename, page_url in process_wat(sys.argv[1], "image"):
    res = detector.FindLanguage(alt)
    pairs += 1
print(pairs, "pairs")
"""


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print("creating the peer's virtual environment (cc2dataset 1.5.0 + cld3-py) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "cc2dataset==1.5.0", "cld3-py"], check=True)
    return python


def build_input(replicas: int) -> tuple[Path, int]:
    data = EXCERPT.read_bytes()
    path = WORK / f"replicated-x{replicas}.warc.wat.gz"
    if not path.exists():
        path.write_bytes(data * replicas)  # gzip members concatenate into a valid multi-member file
    return path, 500 * replicas  # metadata records (the warcinfo record of each copy is not one)


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, (out.stdout.strip() or out.stderr.strip()).splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--core", default="0")
    args = parser.parse_args()
    if not EXCERPT.exists():
        sys.exit(f"the real WAT excerpt is missing: {EXCERPT}")
    WORK.mkdir(exist_ok=True)
    peer_python = ensure_peer()
    wat, records = build_input(args.replicas)
    (WORK / "peer.py").write_text(PEER_SCRIPT)
    ours_bin = shutil.which("laion-assets", path=str(Path(sys.executable).parent)) or "laion-assets"
    pin = ["taskset", "-c", args.core] if shutil.which("taskset") else []
    peer = [*pin, str(peer_python), str(WORK / "peer.py"), str(wat)]
    ours = [*pin, ours_bin, "extract", str(wat), "--output", str(WORK / "ours.parquet"), "--quiet"]

    print(f"input: {wat.name}, {records} records, {wat.stat().st_size / 1e6:.1f} MB; pinned to core {args.core}")
    timed(peer)  # warm-up: page cache, .pyc files
    timed(ours)
    peer_t, ours_t = [], []
    for i in range(args.runs):
        t, peer_line = timed(peer)
        peer_t.append(t)
        t, ours_line = timed(ours)
        ours_t.append(t)
        print(f"run {i + 1}: peer {peer_t[-1]:.2f} s, ours {ours_t[-1]:.2f} s", flush=True)
    peer_med, ours_med = statistics.median(peer_t), statistics.median(ours_t)
    print(f"peer (cc2dataset process_wat + gcld3): {peer_line}")
    print(f"ours (laion-assets extract):           {ours_line}")
    print(f"peer: median {peer_med:.2f} s = {records / peer_med:,.0f} records/s (whole process, one core)")
    print(f"ours: median {ours_med:.2f} s = {records / ours_med:,.0f} records/s (whole process, one core)")
    print(f"ratio (ours / peer records per second): {peer_med / ours_med:.2f}x")


if __name__ == "__main__":
    main()
