"""Every storage path of the pipeline, relative to the storage root (a local directory or `s3://bucket/prefix`).

Nothing else formats a path: the stages, assets, CLI, demo and tests ask this module. The chunk and bucket
counts are part of the paths of everything they split (`chunks=512/buckets=256/`), so files split another way
can never be mixed up.

What the stages write themselves (bulk files, with their completion markers):

    crawls/<crawl>/candidates/chunks=<n>/buckets=<m>/chunk=<c>/bucket=<b>.parquet  (+ _report.json, last)
    crawls/<crawl>/images/buckets=<m>/bucket=<b>/<shard>.tar|.parquet|_stats.json  (+ _manifest.json, last)
    crawls/<crawl>/embeddings/buckets=<m>/{img_emb,text_emb,metadata}/...          (clip-retrieval layout)
    crawls/<crawl>/filtered_metadata/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/release/{en,multi,nolang}/part-NNNNN.parquet  (+ _manifest.json, last)
    crawls/<crawl>/release/statistics.json|.md, plots/*.png
    crawls/<crawl>/knn_index/  and  knn_index/all/                                 (+ _report.json, last)
    removals/v<NNNNNN>.jsonl                                                        (append-only versions)
    lists/<name>.json                          (a URL list registered as crawl list-<name>: where it is, its columns)
    registry/models.json

What the IO manager stores, at keys from the asset key and partition alone (`output_key`): a table as Parquet, a
record as JSON (or a pointer to the record its stage committed above), e.g.

    crawls/<crawl>/wat_manifest.parquet
    crawls/<crawl>/candidate_pairs/chunks=<n>/buckets=<m>/chunk=<c>.json
    crawls/<crawl>/unique_pairs/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/clip_scores/buckets=<m>/bucket=<b>.parquet
    crawls/<crawl>/image_dedup.parquet
    outputs/knn_index_all.json
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from laion_assets.core.settings import FromEnv, setting

CHUNK_MARKER = "_report.json"
INDEX_REPORT = "_report.json"
SHARDS_MANIFEST = "_manifest.json"


def key_width(n: int) -> int:
    return max(4, len(str(n - 1)))


@dataclass(frozen=True)
class Layout(FromEnv):
    """How a crawl is split: chunks of its WAT listing for the parse stage, URL-hash buckets after it.

    Fixed when the code location loads (partition keys must be), from `LAION_ASSETS_CHUNKS` and
    `LAION_ASSETS_BUCKETS`; production uses e.g. 512 and 256."""

    chunks: int = setting(4, "Chunks of a crawl's WAT listing (the parse stage's partitions).",
                          env="LAION_ASSETS_CHUNKS")
    buckets: int = setting(4, "URL-hash buckets of a crawl (every later stage's partitions).",
                           env="LAION_ASSETS_BUCKETS")

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


def url_list(name: str) -> str:
    """The record of a URL list registered in the graph (`laion-assets lists add`)."""
    return f"lists/{name}.json"


def crawl_data() -> str:
    """The folder of a crawl source that lists its crawls (one folder each)."""
    return "crawl-data"


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


SHARD_SUFFIXES = (".tar", ".parquet", "_stats.json")


def shard(prefix: str, name: str) -> ShardKeys:
    return ShardKeys(*(join(prefix, f"{name}{suffix}") for suffix in SHARD_SUFFIXES))


def shard_of(prefix: str, key: str) -> str | None:
    """The shard name (digits) a key directly under prefix belongs to, or None when it is no shard file."""
    name = key[len(join(prefix, "")):]
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)].isdigit():
            return name[: -len(suffix)]
    return None


def shards_manifest(prefix: str) -> str:
    """The list of a download's complete shards, written last: what the CLIP stage reads."""
    return join(prefix, SHARDS_MANIFEST)


# --- the CLIP stage --------------------------------------------------------------------------------------

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


def embedding_numbers(metadata_keys: list[str]) -> list[int]:
    """The file numbers of an embedding folder's metadata files (`metadata/metadata_<i>.parquet`), sorted."""
    return sorted(int(k.rsplit("_", 1)[1].removesuffix(".parquet")) for k in metadata_keys
                  if k.rsplit("/", 1)[-1].startswith("metadata_") and k.endswith(".parquet"))


def bucket_embeddings(crawl: str, bucket: str, layout: Layout) -> EmbeddingKeys:
    return embedding_files(embeddings(crawl, layout), int(bucket))


# --- what the IO manager stores ---------------------------------------------------------------------------------

def output_key(asset: Sequence[str], dims: Mapping[str, str], layout: Layout, suffix: str) -> str:
    """Where the IO manager keeps an asset's output for a partition ({dimension: key}), from the asset key and the
    partition alone: `crawls/<crawl>/<asset>`, then `/chunks=<n>/buckets=<m>/chunk=<c>` or `/buckets=<m>/bucket=<b>`
    (the counts in the path, as for every split), then the suffix (`.parquet` for a table, `.json` for a record);
    `outputs/<asset><suffix>` for an asset no crawl partitions."""
    name = "/".join(asset)
    if "crawl" not in dims:
        return f"outputs/{name}{suffix}"
    key = f"{crawl_root(dims['crawl'])}/{name}"
    # A chunk's output describes its bucket files, so the bucket count is part of its key too.
    split = {"chunk": f"chunks={layout.chunks}/buckets={layout.buckets}", "bucket": f"buckets={layout.buckets}"}
    for dim in sorted(d for d in dims if d != "crawl"):
        key += f"/{split[dim]}/{dim}={dims[dim]}" if dim in split else f"/{dim}={dims[dim]}"
    return key + suffix


def model_registry() -> str:
    """The model registry's overrides (thresholds, checkpoints) that operators change at run time."""
    return "registry/models.json"


# --- the release stage -------------------------------------------------------------------------------------

RELEASE_MANIFEST = "_manifest.json"


def filtered_metadata(crawl: str, bucket: str, layout: Layout) -> str:
    return f"{crawl_root(crawl)}/filtered_metadata/buckets={layout.buckets}/{bucket_file(bucket)}"


def release(crawl: str) -> str:
    return f"{crawl_root(crawl)}/release"


def release_part_name(subset: str, index: int) -> str:
    """A part's name relative to the release folder."""
    return f"{subset}/part-{index:05d}.parquet"


def is_release_part(key: str) -> bool:
    """Whether a key under a release folder is one of its parts (what a rewrite removes when no longer written)."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith("part-") and name.endswith(".parquet")


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

def evaluation_set(name: str, fingerprint: str) -> str:
    """An evaluation set's hashes and embeddings as decontamination prepared them, for one source listing and
    embedding model (the fingerprint): every crawl checked against it reuses them."""
    return f"evaluation/{name}/{fingerprint}.parquet"


# --- the kNN index ---------------------------------------------------------------------------------------------

ALL_INDICES = "all"


def knn_index(crawl: str) -> str:
    """A crawl's kNN index folder: clip-retrieval's `image.index`, `text.index`, their infos, and the metadata."""
    return f"{crawl_root(crawl)}/knn_index"


def knn_index_all() -> str:
    """The crawls' indices merged into one (the `all` indice of the search service)."""
    return f"knn_index/{ALL_INDICES}"


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
        return ivfdata_of(self.index(modality))


def ivfdata_of(index: str) -> str:
    """The on-disk inverted lists beside an index file (`image.index` -> `image.ivfdata`)."""
    return index.removesuffix(".index") + ".ivfdata"


def index_files(prefix: str) -> IndexFiles:
    return IndexFiles(join(prefix, "image.index"), join(prefix, "text.index"), join(prefix, "image.infos.json"),
                      join(prefix, "text.infos.json"), join(prefix, "metadata.arrow"), join(prefix, INDEX_REPORT),
                      join(prefix, "removed_ids.parquet"))
