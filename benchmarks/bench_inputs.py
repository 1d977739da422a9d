"""Reading a URL list: peak memory and time of our streamed reader against img2dataset 1.47's Reader, side by side,
on the same tsv.gz lists of 10k, 100k and 1M rows (url, caption, uid, LAION-like lengths).

Each reading runs in its own process and reports its peak resident memory (ru_maxrss) and wall time:

* ours, streamed: `core/download/inputs.py`'s `iter_batches` over the list (what a list's candidate_pairs chunk
  does): batches of 65,536 rows, nothing kept;
* ours, for a download: what `distributor.run` does before it fetches anything: `reader.read_inputs` streaming the
  selected columns into a local Arrow file (its staging folder's) and mapping it, fingerprinting every 10,000 rows
  on the way, then the plan of 10,000-row shards (`plan.make_plan`), which reads nothing back;
* img2dataset 1.47: its `Reader` (reads the whole file with pyarrow's read_csv, then writes its shard files),
  run in its own virtual environment (benchmarks/work/i2d-venv, which bench_download.py creates).

Usage: python benchmarks/bench_inputs.py [--rows 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "inputs"
PEER_PYTHON = HERE / "work" / "i2d-venv" / "bin" / "python"

OURS_STREAM = """
import json, resource, sys, time
from laion_assets.core.download.inputs import InputSpec, iter_batches
start = time.perf_counter()
rows = sum(b.num_rows for b in iter_batches(InputSpec(sys.argv[1], "tsv.gz", keep=("uid",))))
print(json.dumps({"rows": rows, "s": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
OURS_READ = """
import json, os, resource, sys, tempfile, time
from laion_assets.core.download.plan import make_plan
from laion_assets.core.download.reader import InputColumns, read_inputs
from laion_assets.core.settings import DownloadSettings
start = time.perf_counter()
settings = DownloadSettings(samples_per_shard=10000, save_additional_columns=("uid",))
with tempfile.TemporaryDirectory() as tmp:
    inputs = read_inputs(sys.argv[1], InputColumns(input_format="tsv.gz", keep=("uid",)),
                         spill=os.path.join(tmp, "inputs.arrow"), chunk_rows=settings.samples_per_shard)
    rows = make_plan(inputs, settings).rows
print(json.dumps({"rows": rows, "s": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
PEER = """
import json, resource, sys, tempfile, time
from img2dataset.reader import Reader
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    reader = Reader(sys.argv[1], "tsv.gz", "url", "caption", None, None, ["uid"], 10000, set(), tmp, 0)
    shards = sum(1 for _ in reader)
print(json.dumps({"rows": None, "shards": shards, "s": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_list(path: Path, rows: int) -> None:
    rng = random.Random(0)
    words = ["photo", "of", "a", "red", "car", "on", "the", "beach", "sunset", "vintage", "poster", "cat", "dog"]
    with gzip.open(path, "wt", compresslevel=1) as fh:
        fh.write("url\tcaption\tuid\n")
        for i in range(rows):
            caption = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
            fh.write(f"https://images.example{i % 997}.com/media/{i:09d}/{rng.getrandbits(64):016x}.jpg\t{caption}"
                     f"\t{rng.getrandbits(128):032x}\n")


def measure(python: str, code: str, path: Path) -> dict:
    proc = subprocess.run([python, "-c", code, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    peer = PEER_PYTHON.exists()
    if not peer:
        print(f"(img2dataset's venv {PEER_PYTHON.parent.parent} is missing: run bench_download.py once to create it)")
    print(f"{'rows':>9}  {'ours streamed':>22}  {'ours read and plan':>22}  {'img2dataset Reader':>22}")
    for n in [int(r) for r in args.rows.split(",")]:
        path = WORK / f"list-{n}.tsv.gz"
        if not path.exists():
            write_list(path, n)
        results = [measure(sys.executable, OURS_STREAM, path), measure(sys.executable, OURS_READ, path)]
        with tempfile.TemporaryDirectory():
            results.append(measure(str(PEER_PYTHON), PEER, path) if peer else {"error": "not run"})

        def cell(r: dict) -> str:
            return r["error"][:22] if "error" in r else f"{r['peak_mb']:7.0f} MB {r['s']:6.2f} s"

        print(f"{n:>9}  " + "  ".join(f"{cell(r):>22}" for r in results), flush=True)


if __name__ == "__main__":
    main()
