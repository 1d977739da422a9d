"""Dataset statistics: the post's figures computed the same way, streamed; the asset's files and metadata; the
`stats` command on any Parquet with LAION's columns, and its refusal of one without them."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets.core import paths
from laion_assets.core.release.statistics import QUANTILES, MissingColumnsError, compute_statistics
from laion_assets_tests.release.upstream import local_graph, write_crawl

CRAWL = "CC-MAIN-2099-01"


def _laion_like(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "URL": [f"https://x.example/{i}.jpg" for i in range(n)],
        "TEXT": ["w" * int(k) for k in rng.integers(1, 120, n)],
        "WIDTH": rng.integers(32, 3000, n).astype(np.float64),  # LAION's own files store sizes as doubles
        "HEIGHT": rng.integers(32, 3000, n).astype(np.float64),
        "LANGUAGE": rng.choice(["en", "de", "fr", "", "ja"], n),
        "similarity": rng.random(n), "punsafe": rng.random(n), "pwatermark": rng.random(n),
        "subset": rng.choice(["en", "multi"], n)})


def test_figures_are_the_posts_computed_the_same_way_and_streaming_changes_nothing(tmp_path):
    frame = _laion_like(5000, 0)
    files = []
    for i, part in enumerate(frame.iter_slices(1700)):
        files.append(str(tmp_path / f"p{i}.parquet"))
        part.write_parquet(files[-1])
    stats = compute_statistics(files)
    assert compute_statistics(files, batch_rows=97) == stats
    for name, rows in [("all", frame), ("en", frame.filter(pl.col("subset") == "en"))]:
        got = stats["subsets"][name]
        pdf = rows.to_pandas()
        assert got["total"] == rows.height
        for size in (256, 512, 1024):
            assert got[f"width_and_height_at_least_{size}"] == int(((pdf.WIDTH >= size) & (pdf.HEIGHT >= size)).sum())
        lengths = pdf.TEXT.str.len()
        for column, values in (("width", pdf.WIDTH), ("height", pdf.HEIGHT), ("text_length", lengths)):
            assert np.allclose(got["quantiles"][column], values.quantile(list(QUANTILES)).to_numpy())
        assert got["unsafe_proportion"] == pytest.approx((pdf.punsafe > 0.5).mean())
        assert got["watermark_proportion"] == pytest.approx((pdf.pwatermark > 0.8).mean())
        assert got["average_text_length"] == pytest.approx(lengths.mean())
        top = pdf.LANGUAGE.replace("", "(none)").value_counts()
        assert [(t["language"], t["count"]) for t in got["top_languages"]] == list(top.items())[:10]


def test_dataset_statistics_asset_writes_files_and_one_metadata_entry_per_figure(tmp_path):
    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=300)
    graph.release(CRAWL)
    manifest = json.loads(store.read_bytes(paths.release_manifest(CRAWL)))
    stats = json.loads(store.read_bytes(paths.statistics_json(CRAWL)))
    meta = graph.meta["dataset_statistics"][-1]
    for subset in ("en", "multi", "nolang"):
        assert stats["subsets"][subset]["total"] == manifest["counts"][subset] == meta[f"{subset}/total"]
        assert isinstance(meta[f"{subset}/unsafe_proportion"], float)
    assert meta["all/total"] == sum(manifest["counts"].values())
    assert "| Number of samples |" in meta["statistics"]
    assert store.read_bytes(paths.statistics_markdown(CRAWL)).decode().startswith(f"# {CRAWL} release statistics")
    for name in ("width", "height", "text_length", "similarity", "punsafe", "pwatermark", "languages"):
        assert store.read_bytes(paths.statistics_plot(CRAWL, name))[:8] == b"\x89PNG\r\n\x1a\n"
        assert meta[f"plot/{name}"] == store.uri(paths.statistics_plot(CRAWL, name))


def test_stats_command_on_laion_files_and_on_a_parquet_without_laion_columns(tmp_path):
    frame = _laion_like(800, 1).drop("subset")
    laion = tmp_path / "part-00000.parquet"
    frame.write_parquet(laion)
    out_json, out_md, plots = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "plots"
    result = CliRunner().invoke(main, ["stats", str(laion), "--json", str(out_json), "--markdown", str(out_md),
                                       "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    assert "| Number of samples | 800 |" in result.output
    assert json.loads(out_json.read_text())["subsets"]["all"]["total"] == 800
    assert out_md.read_text().startswith("# Dataset statistics") and (plots / "width.png").exists()
    other = tmp_path / "other.parquet"
    pl.DataFrame({"url": ["a"], "caption": ["b"], "WIDTH": [1]}).write_parquet(other)
    result = CliRunner().invoke(main, ["stats", str(other)])
    assert result.exit_code != 0
    assert "TEXT" in result.output and "HEIGHT" in result.output and "punsafe" in result.output
    with pytest.raises(MissingColumnsError, match="similarity"):
        compute_statistics([str(other)])


def test_aesthetic_quantiles_and_the_laion_aesthetics_counts(tmp_path):
    frame = _laion_like(4000, 3)
    rng = np.random.default_rng(4)
    scores = rng.normal(5.2, 1.1, frame.height).astype(np.float32)
    frame = frame.with_columns(pl.Series("aesthetic", scores).set(pl.Series(rng.random(frame.height) < 0.05), None))
    files = []
    for i, part in enumerate(frame.iter_slices(1500)):
        files.append(str(tmp_path / f"p{i}.parquet"))
        part.write_parquet(files[-1])
    stats = compute_statistics(files)
    assert compute_statistics(files, batch_rows=333) == stats
    got, scored = stats["subsets"]["all"]["aesthetic"], frame["aesthetic"].drop_nulls().to_numpy()
    assert got["scored"] == len(scored)
    for t in ("4.5", "5", "6", "6.5"):
        assert got["at_least"][t] == int((scored >= float(t)).sum())
    # Exact to the histogram's step (0.001), with pandas' interpolation.
    expected = np.quantile(np.round(scored.astype(np.float64), 3), list(QUANTILES))
    assert np.allclose(got["quantiles"], expected, atol=2e-3)
    result = CliRunner().invoke(main, ["stats", *files, "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0 and "Aesthetic >= 6.5" in result.output, result.output
    assert (tmp_path / "plots" / "aesthetic.png").stat().st_size > 1000
    # LAION's own files have no aesthetic column: no aesthetic figures, nothing else changes.
    plain = compute_statistics([str(tmp_path / "p0.parquet")])  # (it has the column)
    frame.drop("aesthetic").write_parquet(tmp_path / "laion.parquet")
    assert compute_statistics([str(tmp_path / "laion.parquet")])["subsets"]["all"]["aesthetic"]["scored"] == 0
    assert plain["subsets"]["all"]["aesthetic"]["scored"] > 0
