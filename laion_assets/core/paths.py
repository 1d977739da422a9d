"""Every storage path of the pipeline, relative to the storage root (a local directory or `s3://bucket/prefix`).

Nothing else formats a path: the stages, assets, CLI, demo and tests ask this module. The chunk and bucket
counts are part of the paths of everything they split (`chunks=512/buckets=256/`), so files split another way
can never be mixed up.

    crawls/<crawl>/wat_manifest.parquet
    crawls/<crawl>/candidates/chunks=<n>/buckets=<m>/chunk=<c>/bucket=<b>.parquet  (+ _report.json, last)
    crawls/<crawl>/unique_pairs/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/images/buckets=<m>/bucket=<b>/<shard>.tar|.parquet|_stats.json  (+ _manifest.json, last)
    crawls/<crawl>/clip_scores/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/embeddings/buckets=<m>/{img_emb,text_emb,metadata}/...          (clip-retrieval layout)
    crawls/<crawl>/safety_scores/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/watermark_scores/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/image_dedup.parquet
    crawls/<crawl>/filtered_metadata/buckets=<m>/bucket=<b>.parquet|.json
    crawls/<crawl>/release/{en,multi,nolang}/part-NNNNN.parquet  (+ _manifest.json, last)
    crawls/<crawl>/release/statistics.json|.md, plots/*.png
    removals/v<NNNNNN>.jsonl                                                        (append-only versions)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CHUNK_MARKER = "_report.json"
SHARDS_MANIFEST = "_manifest.json"


def key_width(n: int) -> int:
    return max(4, len(str(n - 1)))


@dataclass(frozen=True)
class Layout:
    """How a crawl is split: chunks of its WAT listing for the parse stage, URL-hash buckets after it.

    Fixed when the code location loads (partition keys must be), from `LAION_ASSETS_CHUNKS` and
    `LAION_ASSETS_BUCKETS`; production uses e.g. 512 and 256."""

    chunks: int = 4
    buckets: int = 4

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Layout:
        env = os.environ if env is None else env
        return cls(chunks=int(env.get("LAION_ASSETS_CHUNKS", cls.chunks)),
                   buckets=int(env.get("LAION_ASSETS_BUCKETS", cls.buckets)))

    def chunk_key(self, chunk: int) -> str:
        return str(chunk).zfill(key_width(self.chunks))

    def bucket_key(self, bucket: int) -> str:
        return str(bucket).zfill(key_width(self.buckets))

    def chunk_keys(self) -> list[str]:
        return [self.chunk_key(i) for i in range(self.chunks)]

    def bucket_keys(self) -> list[str]:
        return [self.bucket_key(i) for i in range(self.buckets)]


def join(prefix: str, name: str) -> str:
    """A key under a prefix ("" is the storage root itself)."""
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def crawl_root(crawl: str) -> str:
    return f"crawls/{crawl}"


# --- the Common Crawl stage ------------------------------------------------------------------------------

def wat_listing(crawl: str) -> str:
    """Relative to the crawl source, not the storage root: Common Crawl's own layout."""
    return f"crawl-data/{crawl}/wat.paths.gz"


def crawl_data() -> str:
    """The folder of a crawl source that lists its crawls (one folder each)."""
    return "crawl-data"


def wat_manifest(crawl: str) -> str:
    return f"{crawl_root(crawl)}/wat_manifest.parquet"


def candidates(crawl: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/candidates/chunks={layout.chunks}/buckets={layout.buckets}"


def candidates_chunk(crawl: str, chunk: str, layout: Layout) -> str:
    return f"{candidates(crawl, layout)}/chunk={chunk}"


def candidates_file(crawl: str, chunk: str, bucket: str, layout: Layout) -> str:
    return f"{candidates_chunk(crawl, chunk, layout)}/{bucket_file(bucket)}"


def candidates_marker(crawl: str, chunk: str, layout: Layout) -> str:
    return f"{candidates_chunk(crawl, chunk, layout)}/{CHUNK_MARKER}"


def bucket_file(bucket: str) -> str:
    return f"bucket={bucket}.parquet"


def unique_pairs(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/unique_pairs/buckets={layout.buckets}/{bucket_file(bucket)}"


# --- the download stage ----------------------------------------------------------------------------------

def image_shards(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/images/buckets={layout.buckets}/bucket={bucket}"


@dataclass(frozen=True)
class ShardKeys:
    """The three files of one webdataset shard, as img2dataset names them; `stats` is written last."""

    tar: str
    rows: str
    stats: str

    def all(self) -> tuple[str, str, str]:
        return self.tar, self.rows, self.stats


def shard(prefix: str, name: str) -> ShardKeys:
    return ShardKeys(join(prefix, f"{name}.tar"), join(prefix, f"{name}.parquet"), join(prefix, f"{name}_stats.json"))


def shard_of_stats(prefix: str, key: str) -> str | None:
    """The shard name of a `_stats.json` key under prefix, or None when the key is something else."""
    name = key[len(join(prefix, "")):]
    if name.endswith("_stats.json") and "/" not in name and name[: -len("_stats.json")].isdigit():
        return name[: -len("_stats.json")]
    return None


def shards_manifest(prefix: str) -> str:
    """The list of a download's complete shards, written last: what the CLIP stage reads."""
    return join(prefix, SHARDS_MANIFEST)


# --- the CLIP stage --------------------------------------------------------------------------------------

def clip_scores(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/clip_scores/buckets={layout.buckets}/{bucket_file(bucket)}"


def embeddings(crawl: str, layout: Layout) -> str:
    """clip-retrieval's layout for the whole crawl: img_emb/img_emb_<i>.npy and friends, one file per bucket."""
    return f"{crawl_root(crawl)}/embeddings/buckets={layout.buckets}"


@dataclass(frozen=True)
class EmbeddingKeys:
    """One bucket's three embedding files; `metadata` is written last and names the arrays it goes with."""

    img: str
    text: str
    metadata: str


def embedding_files(prefix: str, index: int) -> EmbeddingKeys:
    return EmbeddingKeys(join(prefix, f"img_emb/img_emb_{index}.npy"), join(prefix, f"text_emb/text_emb_{index}.npy"),
                         join(prefix, f"metadata/metadata_{index}.parquet"))


def bucket_embeddings(crawl: str, bucket: str, layout: Layout) -> EmbeddingKeys:
    return embedding_files(embeddings(crawl, layout), int(bucket))


def safety_scores(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/safety_scores/buckets={layout.buckets}/{bucket_file(bucket)}"


def watermark_scores(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/watermark_scores/buckets={layout.buckets}/{bucket_file(bucket)}"


# --- what each asset returns -------------------------------------------------------------------------------

def image_embeddings_manifest(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{embeddings(crawl, layout)}/manifests/bucket={bucket}.json"


def asset_output(asset: str, dims: dict[str, str], layout: Layout) -> str:
    """Where the IO manager stores an asset's output for a partition ({dimension: key}): a Parquet table or a JSON
    record. Bulk-file stages return a record that names their files; where a stage writes its own completion
    marker, the record is that marker."""
    crawl, chunk, bucket = dims.get("crawl", ""), dims.get("chunk", ""), dims.get("bucket", "")
    outputs = {
        "sample_crawl": lambda: "sample_crawl.json",
        "wat_manifest": lambda: wat_manifest(crawl),
        "candidate_pairs": lambda: candidates_marker(crawl, chunk, layout),
        "unique_pairs": lambda: unique_pairs(crawl, bucket, layout),
        "image_shards": lambda: shards_manifest(image_shards(crawl, bucket, layout)),
        "clip_scores": lambda: clip_scores(crawl, bucket, layout),
        "image_embeddings": lambda: image_embeddings_manifest(crawl, bucket, layout),
        "safety_scores": lambda: safety_scores(crawl, bucket, layout),
        "watermark_scores": lambda: watermark_scores(crawl, bucket, layout),
        "image_dedup": lambda: image_dedup(crawl),
        "filtered_metadata": lambda: filtered_record(crawl, bucket, layout),
        "release": lambda: release_manifest(crawl),
        "knn_index": lambda: knn_index_record(crawl),
        "knn_index_all": knn_index_all_record,
    }
    if asset not in outputs:
        raise KeyError(f"no storage path for the output of asset {asset!r}: add it to paths.asset_output")
    return outputs[asset]()


def model_registry() -> str:
    """The model registry's overrides (thresholds, checkpoints) that operators change at run time."""
    return "registry/models.json"


# --- the release stage -------------------------------------------------------------------------------------

RELEASE_MANIFEST = "_manifest.json"


def image_dedup(crawl: str) -> str:
    """Every kept sample of the crawl with what it duplicates (exact and near), crawl-wide."""
    return f"{crawl_root(crawl)}/image_dedup.parquet"


def filtered_metadata(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/filtered_metadata/buckets={layout.buckets}/{bucket_file(bucket)}"


def filtered_record(crawl: str, bucket: str, layout: Layout) -> str:
    """The record naming a bucket's filtered metadata and its counts (what the asset returns)."""
    return filtered_metadata(crawl, bucket, layout).removesuffix(".parquet") + ".json"


def release(crawl: str) -> str:
    return f"{crawl_root(crawl)}/release"


def release_part_name(subset: str, index: int) -> str:
    """A part's name relative to the release folder."""
    return f"{subset}/part-{index:05d}.parquet"


def release_manifest(crawl: str) -> str:
    return join(release(crawl), RELEASE_MANIFEST)


def statistics_json(crawl: str) -> str:
    return join(release(crawl), "statistics.json")


def statistics_markdown(crawl: str) -> str:
    return join(release(crawl), "statistics.md")


def statistics_plot(crawl: str, name: str) -> str:
    return join(release(crawl), f"plots/{name}.png")


def removals() -> str:
    """The removal list's folder: one file per version, never edited once written."""
    return "removals"


def removal_version(version: int) -> str:
    return f"{removals()}/v{version:06d}.jsonl"

# --- the kNN index ---------------------------------------------------------------------------------------------

ALL_INDICES = "all"


def knn_index(crawl: str) -> str:
    """A crawl's kNN index folder: clip-retrieval's `image.index`, `text.index`, their infos, and the metadata."""
    return f"{crawl_root(crawl)}/knn_index"


def knn_index_all() -> str:
    """The crawls' indices merged into one (the `all` indice of the search service)."""
    return f"knn_index/{ALL_INDICES}"


def knn_index_record(crawl: str) -> str:
    """The knn_index asset's record (files, sizes, checksums, counts), beside the folder it describes."""
    return f"{crawl_root(crawl)}/knn_index_record.json"


def knn_index_all_record() -> str:
    return f"knn_index/{ALL_INDICES}_record.json"


def knn_indices_root() -> str:
    """What the search service lists: `crawls/<crawl>/knn_index` folders and `knn_index/all`."""
    return "crawls"


@dataclass(frozen=True)
class IndexFiles:
    """The files of one index folder; `report` is written last and marks the folder complete; `removed` lists the
    rows (ids) removed after the build (filtered out at query time until the rebuild)."""

    image: str
    text: str
    image_infos: str
    text_infos: str
    metadata: str
    report: str
    removed: str

    def index(self, modality: str) -> str:
        return self.image if modality == "image" else self.text

    def infos(self, modality: str) -> str:
        return self.image_infos if modality == "image" else self.text_infos

    def ivfdata(self, modality: str) -> str:
        """The inverted lists of a merged index, kept on disk beside it (faiss reads them memory-mapped)."""
        return f"{self.index(modality)[: -len('.index')]}.ivfdata"


def index_files(prefix: str) -> IndexFiles:
    return IndexFiles(join(prefix, "image.index"), join(prefix, "text.index"), join(prefix, "image.infos.json"),
                      join(prefix, "text.infos.json"), join(prefix, "metadata.arrow"), join(prefix, "_report.json"),
                      join(prefix, "removed_ids.parquet"))
