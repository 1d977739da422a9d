"""`laion-assets` commands on local files and loopback URLs."""

from __future__ import annotations

import polars as pl
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets_tests.crawl import reference

WAT_501 = "CC-MAIN-2016-40-00000.first501.warc.wat.gz"


def test_extract_local_and_https_shaped_urls(realdata, tmp_path, loopback):
    loopback.static("/crawl-data/x.warc.wat.gz", (realdata / WAT_501).read_bytes())
    out = tmp_path / "pairs.parquet"
    result = CliRunner().invoke(
        main, ["extract", str(realdata / WAT_501), f"{loopback.base}/crawl-data/x.warc.wat.gz", "--output", str(out),
               "--crawl", "CC-MAIN-2016-40"])
    assert result.exit_code == 0, result.output
    assert "2 WAT files (0 failed)" in result.output and "pairs" in result.output
    df = pl.read_parquet(out)
    assert {"url", "text", "page_url", "language", "language_score"} <= set(df.columns)
    assert df.height == 2 * len(reference.read(realdata / WAT_501).kept)  # the same file twice


def test_extract_reports_unreadable_files(realdata, tmp_path):
    out = tmp_path / "pairs.parquet"
    result = CliRunner().invoke(main, ["extract", str(realdata / WAT_501), str(tmp_path / "nope.gz"), "-o", str(out)])
    assert result.exit_code == 1
    assert "1 failed" in result.output
    assert pl.read_parquet(out).height == len(reference.read(realdata / WAT_501).kept)


def test_sample_crawl_then_extract_then_dedup(tmp_path):
    runner = CliRunner()
    mirror = tmp_path / "mirror"
    assert runner.invoke(main, ["sample-crawl", "--mirror", str(mirror), "--wat-files", "2"]).exit_code == 0
    wats = sorted(str(p) for p in mirror.rglob("*.warc.wat.gz"))
    pairs, unique = tmp_path / "p.parquet", tmp_path / "u.parquet"
    assert runner.invoke(main, ["extract", *wats, "-o", str(pairs)]).exit_code == 0
    result = runner.invoke(main, ["dedup", str(pairs), "-o", str(unique)])
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(unique)
    assert df["url"].is_unique().all() and df["occurrences"].sum() == pl.read_parquet(pairs).height


def test_every_benchmark_starts(tmp_path):
    """The benchmarks are not tests, but they must not rot: each one imports and parses its options."""
    import subprocess
    import sys
    from pathlib import Path

    for script in sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py")):
        result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (script.name, result.stderr[-2000:])


def test_every_import_of_the_project_in_benchmarks_and_tests_resolves():
    """Imports inside functions run only when a benchmark runs: each `from laion_assets... import name` names a module
    or an attribute that exists."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    unresolved = []
    for path in sorted([*(root / "benchmarks").glob("*.py"), *(root / "laion_assets_tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("laion_assets"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ModuleNotFoundError:
                            unresolved.append(f"{path.name}: from {node.module} import {alias.name}")
    assert unresolved == []
