"""The dataset statistics of the LAION-5B release post, computed the same way, for each subset and for all rows:
the total; how many images have both width and height of at least 256, 512 and 1024 px; width, height and
text-length quantiles at 0.05, 0.10, ..., 0.95 (linear interpolation between the two nearest ranks, as pandas'
`quantile`); the unsafe proportion (punsafe > 0.5) and watermark proportion (pwatermark > 0.8) of all rows (a missing
score counts as neither); the average text length (characters); the top 10 languages with count and proportion. When
the files have an `aesthetic` column (ours; LAION published its scores apart): its quantiles and how many samples
are at least 4.5, 5, 6 and 6.5 (the LAION-Aesthetics subsets), with a plot.

Streamed in bounded memory: batches are read from the Parquet files one at a time into exact histograms (one
counter per integer width, height and text length, 50 bins for the scores), so memory grows with the largest
value seen, never with the number of rows, and the quantiles are exact (the aesthetic score's to 0.001, the step
its histogram counts in). Works on any Parquet with LAION's column
names (ours or LAION's own files); `subset` and `LANGUAGE` are used when present.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REQUIRED_COLUMNS = ("TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark")
OPTIONAL_COLUMNS = ("LANGUAGE", "subset", "aesthetic", "semantic_duplicate_of")
# LAION-Aesthetics: the samples at these scores and above; the score histogrammed in steps of 0.001 from -20.
AESTHETIC_THRESHOLDS = (4.5, 5.0, 6.0, 6.5)
AESTHETIC_STEP, AESTHETIC_LOW = 0.001, -20.0
QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))
SIZES = (256, 512, 1024)
UNSAFE_ABOVE, WATERMARK_ABOVE = 0.5, 0.8
SCORE_BINS = 50
ALL = "all"


class MissingColumnsError(ValueError):
    """A Parquet file given to the statistics lacks LAION's columns."""


def _grow(hist: np.ndarray, values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values, minlength=len(hist))
    if len(counts) > len(hist):
        hist = np.concatenate([hist, np.zeros(len(counts) - len(hist), np.int64)])
    hist[: len(counts)] += counts
    return hist


def quantiles_of(hist: np.ndarray, qs: Iterable[float] = QUANTILES) -> list[float]:
    """Quantiles of the integers a histogram counts (hist[v] = how many v), with pandas' linear interpolation."""
    n = int(hist.sum())
    if n == 0:
        return [float("nan") for _ in qs]
    cum = np.cumsum(hist)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, frac = int(np.floor(pos)), pos - np.floor(pos)
        v_lo = int(np.searchsorted(cum, lo, side="right"))
        v_hi = int(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
        out.append(float(v_lo + (v_hi - v_lo) * frac))
    return out


@dataclass
class SubsetAccumulator:
    rows: int = 0
    at_least: dict[int, int] = field(default_factory=lambda: dict.fromkeys(SIZES, 0))
    width: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    height: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    text_length: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    unsafe: int = 0
    watermark: int = 0
    languages: Counter = field(default_factory=Counter)
    scores: dict[str, np.ndarray] = field(
        default_factory=lambda: {c: np.zeros(SCORE_BINS, np.int64) for c in ("similarity", "punsafe", "pwatermark")})
    aesthetic: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # counts per AESTHETIC_STEP
    aesthetic_at_least: dict[float, int] = field(default_factory=lambda: dict.fromkeys(AESTHETIC_THRESHOLDS, 0))
    semantic_duplicates: int = 0  # rows the semantic dedup marked (the release keeps them unless told to drop)

    def add(self, batch: Any) -> None:
        """Add a polars DataFrame of rows."""
        import polars as pl

        self.rows += batch.height
        w = batch["WIDTH"].fill_null(0).cast(pl.Int64).clip(0).to_numpy()
        h = batch["HEIGHT"].fill_null(0).cast(pl.Int64).clip(0).to_numpy()
        for size in SIZES:
            self.at_least[size] += int(((w >= size) & (h >= size)).sum())
        self.width, self.height = _grow(self.width, w), _grow(self.height, h)
        self.text_length = _grow(self.text_length, batch["TEXT"].fill_null("").str.len_chars().cast(pl.Int64)
                                 .to_numpy())
        self.unsafe += int((batch["punsafe"].fill_null(0) > UNSAFE_ABOVE).sum())
        self.watermark += int((batch["pwatermark"].fill_null(0) > WATERMARK_ABOVE).sum())
        if "semantic_duplicate_of" in batch.columns:
            self.semantic_duplicates += int(batch["semantic_duplicate_of"].is_not_null().sum())
        if "LANGUAGE" in batch.columns:
            for lang, n in batch["LANGUAGE"].fill_null("").value_counts().iter_rows():
                self.languages[lang] += int(n)
        for column, hist in self.scores.items():
            values = batch[column].drop_nulls().cast(pl.Float64).to_numpy()
            hist += np.histogram(np.clip(values, 0.0, 1.0), bins=SCORE_BINS, range=(0.0, 1.0))[0]
        if "aesthetic" in batch.columns:
            values = batch["aesthetic"].drop_nulls().cast(pl.Float64).to_numpy()
            values = values[np.isfinite(values)]
            for t in AESTHETIC_THRESHOLDS:
                self.aesthetic_at_least[t] += int((values >= t).sum())
            codes = np.clip(np.rint((values - AESTHETIC_LOW) / AESTHETIC_STEP), 0, None).astype(np.int64)
            self.aesthetic = _grow(self.aesthetic, codes)

    def figures(self) -> dict[str, Any]:
        n = self.rows
        lengths = np.arange(len(self.text_length))
        # Ties by name, so that the same rows give the same list however they were batched.
        top = sorted(self.languages.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return {
            "total": n,
            **{f"width_and_height_at_least_{s}": self.at_least[s] for s in SIZES},
            "unsafe_proportion": self.unsafe / n if n else 0.0,
            "watermark_proportion": self.watermark / n if n else 0.0,
            "average_text_length": float((lengths * self.text_length).sum() / n) if n else 0.0,
            "semantic_duplicates": self.semantic_duplicates,
            "semantic_duplicate_proportion": self.semantic_duplicates / n if n else 0.0,
            "quantiles": {"q": list(QUANTILES), "width": quantiles_of(self.width),
                          "height": quantiles_of(self.height), "text_length": quantiles_of(self.text_length)},
            "top_languages": [{"language": lang or "(none)", "count": c, "proportion": c / n if n else 0.0}
                              for lang, c in top],
            "histograms": {
                "width": _trimmed(self.width), "height": _trimmed(self.height),
                "text_length": _trimmed(self.text_length),
                **{c: h.tolist() for c, h in self.scores.items()}},
            "aesthetic": self._aesthetic_figures(),
        }

    def _aesthetic_figures(self) -> dict[str, Any]:
        """The score's quantiles, mean and the LAION-Aesthetics counts (scored: the rows that have a score)."""
        scored = int(self.aesthetic.sum())
        values = np.arange(len(self.aesthetic)) * AESTHETIC_STEP + AESTHETIC_LOW
        quantiles = ([round(v * AESTHETIC_STEP + AESTHETIC_LOW, 4) for v in quantiles_of(self.aesthetic)]
                     if scored else [])
        # 0.1-wide bins from 0 to 10 (the predictor's range), for the plot
        bins = np.histogram(values, bins=100, range=(0.0, 10.0), weights=self.aesthetic)[0] if scored else []
        return {"scored": scored, "mean": float((values * self.aesthetic).sum() / scored) if scored else 0.0,
                "quantiles": quantiles,
                "at_least": {f"{t:g}": self.aesthetic_at_least[t] for t in AESTHETIC_THRESHOLDS},
                "histogram": [int(c) for c in bins]}


def _trimmed(hist: np.ndarray) -> list[int]:
    nz = np.flatnonzero(hist)
    return hist[: nz[-1] + 1].tolist() if len(nz) else []


def check_columns(names: list[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise MissingColumnsError(f"{where} lacks LAION's column(s) {', '.join(missing)} (it has: "
                                  f"{', '.join(names[:20])})")


def compute_statistics(files: list[str], batch_rows: int = 262_144) -> dict[str, Any]:
    """The statistics of local Parquet files, per `subset` (when the files have one) and for all rows."""
    import polars as pl
    import pyarrow.parquet as pq

    if not files:
        raise ValueError("no Parquet file given")
    for f in files:
        check_columns(pq.ParquetFile(f).schema_arrow.names, f)
    subsets: dict[str, SubsetAccumulator] = {}
    everything = SubsetAccumulator()
    for f in files:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        columns = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            everything.add(frame)
            if "subset" in frame.columns:
                for (name,), part in frame.group_by("subset"):
                    subsets.setdefault(str(name), SubsetAccumulator()).add(part)
    out = {name: acc.figures() for name, acc in sorted(subsets.items())}
    out[ALL] = everything.figures()
    return {"subsets": out, "files": len(files)}


HEADLINES = ("total", "width_and_height_at_least_256", "width_and_height_at_least_512",
             "width_and_height_at_least_1024", "unsafe_proportion", "watermark_proportion", "average_text_length")


def headline_figures(stats: dict[str, Any]) -> dict[str, float]:
    """One number per headline figure and subset (`en/total`, ...), plus the medians: what the UI plots."""
    out: dict[str, float] = {}
    for name, figures in stats["subsets"].items():
        for h in HEADLINES:
            out[f"{name}/{h}"] = figures[h]
        q = figures["quantiles"]
        median = q["q"].index(0.5)
        for column in ("width", "height", "text_length"):
            value = q[column][median]
            out[f"{name}/median_{column}"] = value if value == value else 0.0  # NaN (no rows) as 0
        for key in ("semantic_duplicates", "semantic_duplicate_proportion"):
            if key in figures:  # statistics.json written before the semantic dedup lacks them
                out[f"{name}/{key}"] = figures[key]
        aesthetic = figures.get("aesthetic", {})
        if aesthetic.get("scored"):
            out[f"{name}/median_aesthetic"] = aesthetic["quantiles"][median]
            for t, n in aesthetic["at_least"].items():
                out[f"{name}/aesthetic_at_least_{t}"] = n
    return out


def _num(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:,.1f}"


def to_markdown(stats: dict[str, Any], title: str = "Dataset statistics") -> str:
    """The post's layout: a summary table (a column per subset), then the quantiles and languages of each subset."""
    names = list(stats["subsets"])
    sub = stats["subsets"]
    labels = {"total": "Number of samples", "width_and_height_at_least_256": "Width and height >= 256",
              "width_and_height_at_least_512": "Width and height >= 512",
              "width_and_height_at_least_1024": "Width and height >= 1024",
              "unsafe_proportion": "Unsafe proportion (punsafe > 0.5)",
              "watermark_proportion": "Watermark proportion (pwatermark > 0.8)",
              "average_text_length": "Average text length"}
    lines = [f"# {title}", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(_num(sub[n][key]) for n in names) + " |")
    if any(sub[n].get("semantic_duplicates") for n in names):
        lines.append("| Semantic duplicates (marked) | "
                     + " | ".join(_num(sub[n].get("semantic_duplicates", 0)) for n in names) + " |")
    if any(sub[n].get("aesthetic", {}).get("scored") for n in names):
        for t in AESTHETIC_THRESHOLDS:
            lines.append(f"| Aesthetic >= {t:g} (LAION-Aesthetics) | "
                         + " | ".join(_num(sub[n]["aesthetic"]["at_least"][f"{t:g}"]) for n in names) + " |")
    for n in names:
        q = sub[n]["quantiles"]
        aesthetic = sub[n].get("aesthetic", {})
        scored = bool(aesthetic.get("scored"))
        lines += ["", f"## {n}: quantiles", "", "| quantile | width | height | text length |"
                  + (" aesthetic |" if scored else ""), "|---:|---:|---:|---:|" + ("---:|" if scored else "")]
        for i, qv in enumerate(q["q"]):
            lines.append(f"| {qv:.2f} | {q['width'][i]:.1f} | {q['height'][i]:.1f} | {q['text_length'][i]:.1f} |"
                         + (f" {aesthetic['quantiles'][i]:.3f} |" if scored else ""))
        if sub[n]["top_languages"]:
            lines += ["", f"## {n}: top languages", "", "| language | count | proportion |", "|---|---:|---:|"]
            lines += [f"| {t['language']} | {t['count']:,} | {t['proportion']:.4f} |" for t in sub[n]["top_languages"]]
    return "\n".join(lines) + "\n"


def summary_table(stats: dict[str, Any]) -> str:
    """The summary table alone (what the demo prints)."""
    md = to_markdown(stats)
    return md.split("\n\n## ")[0].split("\n", 2)[2]


PLOTS = ("width", "height", "text_length", "similarity", "punsafe", "pwatermark", "languages", "aesthetic")


def write_plots(stats: dict[str, Any], directory: str) -> dict[str, str]:
    """PNG histograms (one line per subset) and a language bar chart into a local directory; name -> path."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    out: dict[str, str] = {}
    subsets = {n: f for n, f in stats["subsets"].items() if n != ALL} or stats["subsets"]
    for name in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
        if name == "languages":
            top = stats["subsets"][ALL]["top_languages"]
            ax.bar([t["language"] for t in top], [t["count"] for t in top])
            ax.set_ylabel("samples")
        elif name == "aesthetic":
            for subset, figures in subsets.items():
                hist = figures.get("aesthetic", {}).get("histogram") or []
                if hist:
                    ax.plot((np.arange(len(hist)) + 0.5) / 10, hist, label=subset)
            for t in AESTHETIC_THRESHOLDS:
                ax.axvline(t, linestyle=":", color="grey")
            ax.set_xlabel("aesthetic score (dotted: the LAION-Aesthetics thresholds 4.5, 5, 6, 6.5)")
            ax.set_ylabel("samples")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        else:
            for subset, figures in subsets.items():
                hist = np.asarray(figures["histograms"][name], dtype=float)
                if name in ("similarity", "punsafe", "pwatermark"):
                    x = (np.arange(SCORE_BINS) + 0.5) / SCORE_BINS
                else:
                    x, hist = _rebin(hist)
                ax.plot(x, hist, label=subset)
            ax.set_ylabel("samples")
            ax.legend()
        ax.set_title(name.replace("_", " "))
        fig.tight_layout()
        path = os.path.join(directory, f"{name}.png")
        fig.savefig(path)
        plt.close(fig)
        out[name] = path
    return out


def _rebin(hist: np.ndarray, bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A long integer histogram in at most `bins` equal-width bins (their centres, their counts)."""
    if len(hist) == 0:
        return np.zeros(0), np.zeros(0)
    width = max(1, int(np.ceil(len(hist) / bins)))
    padded = np.concatenate([hist, np.zeros((-len(hist)) % width)])
    counts = padded.reshape(-1, width).sum(axis=1)
    return np.arange(len(counts)) * width + width / 2, counts


def run(store: Any, crawl: str, part_keys: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The dataset statistics' entry point: the statistics of a crawl's release parts, written beside them:
    statistics.json, statistics.md and the PNG plots. Returns the statistics and {file kind or plot name: storage
    key}."""
    import json
    import os

    from laion_assets.core import paths

    if part_keys:
        with store.local_copies(part_keys) as local:
            stats = compute_statistics(local)
    else:  # everything removed or filtered out: the figures of nothing, not a failure
        stats = {"subsets": {ALL: SubsetAccumulator().figures()}, "files": 0}
    stats["crawl"] = crawl
    written = {"json": paths.statistics_json(crawl), "markdown": paths.statistics_markdown(crawl)}
    with store.staging_dir() as stage:
        for name, local in write_plots(stats, os.path.join(stage, "plots")).items():
            written[name] = paths.statistics_plot(crawl, name)
            store.put_file(local, written[name])
    store.write_bytes(written["markdown"], to_markdown(stats, f"{crawl} release statistics").encode())
    store.write_bytes(written["json"], json.dumps(stats, indent=1, sort_keys=True).encode())
    return stats, written
