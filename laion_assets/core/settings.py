"""The settings of every stage: one frozen dataclass per stage (or per part of a stage), with defaults and help.

The CLI generates its options from these fields (`laion_assets/cli_options.py`) and the Dagster `Config`
classes and resources generate theirs (`laion_assets/config.py`); both turn what they were given back into a
settings object with `build`, and the deployment's environment is read by `from_env`, so a default lives in exactly
one place. Field metadata: `help` (shown by `--help` and in the launchpad), `cli` (the option's name when it is not
the field name with dashes) and `env` (the environment variable, or variables in order of preference, that
`from_env` reads it from). Kept free of heavy imports so that the CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from laion_assets.core.download.guard import parse_nameserver

S = TypeVar("S")

# One honest identity for every request the project makes (crawl files and images alike).
USER_AGENT = "laion-assets/0.1 (image-text dataset builder; +https://github.com/laion-assets/laion_assets)"
DEFAULT_SOURCE = "data/sample-mirror"
DEFAULT_STORAGE = "data"
DEFAULT_MODELS_DIR = "data/models"
SAMPLE_CRAWL = "CC-MAIN-2099-01"
DEFAULT_IMAGE_BASE = "http://127.0.0.1:8765/"
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
MODEL_PRESETS = ("small", "laion")
OUTPUT_FORMATS = ("webdataset", "files", "parquet")
HASHES = ("none", "md5", "sha256", "sha512")
INCREMENTAL_MODES = ("incremental", "overwrite", "extend")
# The row columns img2dataset 1.47 reserves (its arguments_validator), refused in save_additional_columns as it
# refuses them; ours (the other columns of a shard's Parquet rows) are refused too, since a kept column would
# overwrite them.
RESERVED_COLUMNS = ("key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512")
OUR_ROW_COLUMNS = ("http_status", "final_url", "phash", "language", "bytes_downloaded")
DEPLOYMENTS = ("local", "production")


def setting(default: Any, help: str, cli: str | None = None,  # noqa: A002 - click's own word
            env: str | tuple[str, ...] | None = None) -> Any:
    """A settings field with its help text, its CLI option name when it differs from the field's, and the
    environment variable(s) a deployment sets it with."""
    metadata: dict[str, Any] = {"help": help}
    if cli:
        metadata["cli"] = cli
    if env:
        metadata["env"] = (env,) if isinstance(env, str) else tuple(env)
    return dataclasses.field(default=default, metadata=metadata)


def scalar_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings class that are plain values (nested settings excluded)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _plain(hint: Any) -> Any:
    """`float | None` -> float: the type a value is parsed or converted to."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def build(cls: type[S], values: Mapping[str, Any] | Any, **nested: Any) -> S:
    """The settings object of what a CLI command or a Dagster config was given: a mapping (a command's keyword
    arguments) or an object with the fields as attributes (a `Config` or a resource). Fields it lacks keep their
    defaults; sequences become the tuples the dataclass holds; nested settings are passed in."""
    hints = typing.get_type_hints(cls)
    chosen: dict[str, Any] = {}
    for f in scalar_fields(cls):
        if isinstance(values, Mapping):
            if f.name not in values:
                continue
            value = values[f.name]
        elif hasattr(values, f.name):
            value = getattr(values, f.name)
        else:
            continue
        chosen[f.name] = tuple(value) if typing.get_origin(hints[f.name]) is tuple else value
    return cls(**chosen, **nested)


def _parse(text: str, hint: Any) -> Any:
    hint = _plain(hint)
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return tuple(_parse(v.strip(), inner) for v in text.split(",") if v.strip())
    if hint is bool:
        if text.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"not a boolean: {text!r}")
        return text.strip().lower() in ("1", "true", "yes", "on")
    return hint(text)


def from_env(cls: type[S], env: Mapping[str, str] | None = None, **nested: Any) -> S:
    """The settings of the deployment: each field with `env` metadata from the first of its variables that is set
    and not empty (comma-separated for lists), the others at their defaults: an empty variable is an unset one, as a
    Helm value left blank is. A value that does not parse is an error naming the variable."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = next((n for n in f.metadata.get("env", ()) if env.get(n, "").strip()), None)
        if name is None:
            continue
        try:
            values[f.name] = _parse(env[name], hints[f.name])
        except ValueError as err:
            raise ValueError(f"{name}={env[name]!r}: {err}") from None
    return cls(**values, **nested)


class FromEnv:
    """Settings a deployment sets through its environment: `Cls.from_env(env)` is `from_env(Cls, env)`."""

    @classmethod
    def from_env(cls: type[S], env: Mapping[str, str] | None = None) -> S:
        return from_env(cls, env)


# --- where everything is stored ------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageSettings(FromEnv):
    """The storage root every stage writes under, and how to reach it when it is on S3 (boto3 reads credentials
    from its own variables and files)."""

    root: str = setting(DEFAULT_STORAGE, "Storage root: a local directory or s3://bucket/prefix.", cli="--storage",
                        env="LAION_ASSETS_STORAGE")
    endpoint_url: str = setting("", "S3 endpoint (empty: AWS's).", env="AWS_ENDPOINT_URL")
    region: str = setting("", "S3 region (empty: boto3's default).", env=("AWS_REGION", "AWS_DEFAULT_REGION"))


# --- the Common Crawl stage ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceSettings(FromEnv):
    """Where crawl files come from and how hard to try reading them."""

    base: str = setting(DEFAULT_SOURCE, "Crawl source: a local mirror, s3://commoncrawl or "
                                        "https://data.commoncrawl.org.", cli="--source", env="LAION_ASSETS_SOURCE")
    retries: int = setting(4, "Retries of a remote crawl file within one step attempt, on transient errors only: "
                              "an HTTP download, or each S3 request (botocore's own retries), is tried at most "
                              "retries + 1 times. Dagster's RetryPolicy runs the step up to max_retries + 1 times, "
                              "so a WAT file is tried at most (retries + 1) * (max_retries + 1) times in a run.")
    timeout_s: float = setting(120.0, "Socket timeout of one WAT file request, in seconds.", cli="--timeout")
    backoff_s: float = setting(1.0, "First delay before an HTTP retry, in seconds; doubles on each retry (S3 "
                                    "requests back off as botocore's standard mode does).", cli="--backoff")
    requests_per_s: float = setting(10.0, "HTTP requests per second to one crawl source, per process (0: no limit); "
                                          "halved by each 429 or 503, recovering with each success.")
    max_retry_after_s: float = setting(120.0, "Longest Retry-After of a crawl source honoured, in seconds.",
                                       cli="--max-retry-after")
    throttle_budget_s: float = setting(900.0, "Seconds one crawl file may wait on 429/503 answers with Retry-After "
                                              "without using its retries.")


@dataclass(frozen=True)
class ExtractSettings:
    """The extraction rules' parameters (LAION-5B's values by default)."""

    min_text_length: int = setting(5, "Alt texts shorter than this (after cleaning) are dropped.")
    max_text_length: int = setting(1000, "Alt texts are truncated to this many characters.")
    drop_extensions: tuple[str, ...] = setting((".svg", ".svgz", ".gif"), "Image URL endings that are dropped.",
                                               cli="--drop-extension")
    # Alt texts repeat a lot within a crawl ("logo", product names); cleaning and language ID are pure
    # functions of the raw text, so their results are cached per process.
    text_cache_size: int = setting(200_000, "Cleaned alt texts cached per process.")
    # A WAT file unreadable after retries fails the partition (after the chunk's other files are written), so
    # that Dagster shows it as failed and a retry redoes it; the CLI exits with status 1.
    fail_on_unreadable_wat: bool = setting(True, "Fail when a WAT file cannot be read after retries.")
    robots_meta_names: tuple[str, ...] = setting(("robots", "ccbot", "laion-assets"), "Names of the <meta> tags whose "
                                                 "directives a pair keeps in its robots column (lower case; the "
                                                 "download's agent token should be one).", cli="--robots-meta-name")


# --- the sample crawl (offline) ------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSettings:
    crawl: str = setting(SAMPLE_CRAWL, "Crawl ID of the sample crawl.")
    image_base_url: str = setting(DEFAULT_IMAGE_BASE, "Where the sample pages link their images.")
    wat_files: int = setting(4, "WAT files in the sample crawl.")
    pages_per_file: int = setting(30, "HTML pages per WAT file.")
    images_per_page: int = setting(5, "Images shown per page.")
    seed: int = setting(0, "Seed of everything random in the sample crawl.")


# --- the download stage --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchSettings(FromEnv):
    """Politeness and safety of image fetching: deployment settings, on by default."""

    user_agent: str = setting(USER_AGENT, "User-Agent of every request.")
    agent_token: str = setting("laion-assets", "The robots.txt and X-Robots-Tag user-agent token we obey.")
    connections: int = setting(64, "Requests in flight at once, per process.")
    per_host: int = setting(8, "Requests in flight at once per host.")
    connect_timeout_s: float = setting(10.0, "Connect and read-gap timeout in seconds.", cli="--connect-timeout")
    deadline_s: float = setting(30.0, "Seconds per URL, all in (redirects and retries), counted from when the "
                                      "request holds its connection slot.", cli="--deadline")
    max_bytes: int = setting(25 * 1024 * 1024, "Largest response body accepted, in bytes.")
    max_redirects: int = setting(5, "Redirects followed per URL, each hop re-checked.")
    retries: int = setting(2, "Retries on timeouts, 5xx and connection resets (never 4xx or refused; DNS has its "
                              "own, dns_retries).")
    backoff_s: float = setting(0.5, "First retry delay in seconds; doubles on each retry.", cli="--backoff")
    max_retry_after_s: float = setting(30.0, "Longest Retry-After honoured, in seconds.", cli="--max-retry-after")
    respect_robots_txt: bool = setting(True, "Obey each host's robots.txt (RFC 9309).")
    respect_x_robots_tag: bool = setting(True, "Skip images whose X-Robots-Tag says noai, noimageai, noindex or "
                                               "noimageindex.")
    respect_page_opt_out: bool = setting(True, "Skip the images of a page whose X-Robots-Tag or robots meta tag "
                                               "(for our token, CCBot or every robot) says noai or noimageai.")
    respect_tdmrep: bool = setting(True, "Skip images reserved by TDMRep (tdm-reservation header or the origin's "
                                         "/.well-known/tdmrep.json).")
    allow_networks: tuple[str, ...] = setting((), "CIDR exempt from the address guard (repeatable).",
                                              cli="--allow-network", env="LAION_ASSETS_ALLOW_NETWORKS")
    nameservers: tuple[str, ...] = setting((), "DNS server as IP[:PORT] (repeatable; default: the system's, from "
                                               "/etc/resolv.conf). A local caching resolver is best, see "
                                               "docs/download.md.", cli="--nameserver")
    dns_timeout_s: float = setting(1.0, "Seconds a DNS query is given before another is sent beside it.",
                                   cli="--dns-timeout")
    dns_retries: int = setting(3, "DNS queries after the first on timeouts and server failures (never NXDOMAIN).")
    dns_backoff_s: float = setting(0.1, "First delay after a DNS server failure, in seconds; doubles on each retry.",
                                   cli="--dns-backoff")
    dns_in_flight: int = setting(64, "Host names being looked up at once, per process.")
    dns_negative_ttl_s: float = setting(30.0, "Seconds an NXDOMAIN or a name without addresses is remembered.",
                                        cli="--dns-negative-ttl")
    proxy: str = setting("", "Forward proxy for every request, http://[user:pass@]host:port (https URLs go "
                             "through CONNECT); the address guard still judges each target first.")
    trust_env: bool = setting(False, "Take the proxy from HTTP_PROXY / HTTPS_PROXY and honour NO_PROXY (when "
                                     "--proxy is not given).")

    def __post_init__(self) -> None:
        for server in self.nameservers:
            parse_nameserver(server)
        if self.proxy and not self.proxy.startswith("http://"):
            raise ValueError(f"proxy must be an http:// URL, not {self.proxy!r}")


@dataclass(frozen=True)
class ResizeSettings:
    """What each stored image looks like; every field changes the shards' bytes."""

    image_size: int = setting(256, "Target size in pixels.")
    resize_mode: str = setting("border", f"One of {', '.join(RESIZE_MODES)} (as img2dataset).")
    encode_format: str = setting("jpg", f"One of {', '.join(ENCODE_FORMATS)}.")
    encode_quality: int = setting(95, "JPEG/WebP quality.")
    min_image_size: int = setting(0, "Images whose smaller side is under this fail with failed_to_resize.")
    max_aspect_ratio: float = setting(0.0, "Images whose aspect ratio is over this fail (0: no limit).")
    max_pixels: int = setting(89_478_485, "Pixel budget checked from the header before any decoding.")
    keep_original: bool = setting(False, "Also store the downloaded bytes as {key}.original.{ext}.")
    resize_only_if_bigger: bool = setting(False, "Only shrink: images already within image_size keep their size "
                                                 "(still padded or cropped by the mode), as img2dataset's option.")
    skip_reencode: bool = setting(False, "Keep the downloaded bytes when no resize, blur or alpha matting changed "
                                         "the pixels and they already are in encode_format (img2dataset's option).")
    disable_all_reencoding: bool = setting(False, "Store the downloaded bytes as they are: no resize, no blur, no "
                                                  "re-encoding (the header is still read for the size checks).")

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {sorted(ENCODE_FORMATS)}, not {self.encode_format!r}")


@dataclass(frozen=True)
class DownloadSettings:
    """The download stage: shard layout and parallelism, plus how to fetch and how to store each image."""

    samples_per_shard: int = setting(10_000, "URLs per shard.")
    processes: int = setting(0, "Worker processes (0: one per CPU core); with fewer shards than processes the "
                                "shards are split between them.")
    resize_threads: int = setting(1, "Decode/resize threads per process.")
    in_flight: int = setting(256, "URLs being fetched or resized at once, per process.")
    output_format: str = setting("webdataset", f"One of {', '.join(OUTPUT_FORMATS)}: a tar per shard, a folder of "
                                               "files per shard, or a Parquet file per shard with the image bytes "
                                               "(img2dataset's layouts; the CLIP stage reads webdataset).")
    save_additional_columns: tuple[str, ...] = setting((), "Input columns copied to each sample's row in the "
                                                           "shard's Parquet and its .json (repeatable; img2dataset's "
                                                           "reserved names refused).",
                                                       cli="--save-additional-columns")
    compute_hash: str = setting("sha256", f"Hash of the downloaded bytes in a column of its name: "
                                          f"{', '.join(HASHES)} (sha256 is always there: the image dedup uses it).")
    verify_hash: str = setting("", "COL,ALGO: compare the downloaded bytes' ALGO digest (md5, sha256, sha512) with "
                                   "input column COL; a mismatch is status hash_mismatch with both digests.")
    bbox_col: str = setting("", "Input column of boxes [x0, y0, x1, y1] relative to the image, blurred after the "
                                "resize (DataComp's face_bboxes); also kept in the rows.")
    extract_exif: bool = setting(False, "Record the image's EXIF tags as a JSON string in an `exif` column.")
    incremental_mode: str = setting("incremental", f"One of {', '.join(INCREMENTAL_MODES)}: resume (complete "
                                                   "shards kept), start over (the folder emptied first), or add "
                                                   "shards after the existing ones (img2dataset's modes).")
    shard_digits: int = setting(0, "Digits of the shard names and of the shard part of keys (img2dataset's "
                                   "oom_shard_count; 0: at least 5, more when there are more shards).")
    min_image_bytes: int = setting(5_000, "Downloaded bodies under this many bytes fail before decoding (LAION-5B "
                                          "dropped images under 5 KB; 0 keeps everything, img2dataset's default).")
    # A second chance: complete shards keep their successes and permanent failures, and only the rows whose
    # failure another try may change (report.is_transient) are fetched again and the shard rewritten.
    retry_failed: bool = setting(False, "Also re-fetch the transient failures of complete shards (timeouts, 5xx, "
                                        "408/425/429, resets, temporary DNS failures, unreachable policy files); "
                                        "never successes, other 4xx, NXDOMAIN or policy refusals.")
    fetch: FetchSettings = dataclasses.field(default_factory=FetchSettings)
    resize: ResizeSettings = dataclasses.field(default_factory=ResizeSettings)

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {self.output_format!r}")
        if self.compute_hash not in HASHES:
            raise ValueError(f"compute_hash must be one of {HASHES}, not {self.compute_hash!r}")
        if self.incremental_mode not in INCREMENTAL_MODES:
            raise ValueError(f"incremental_mode must be one of {INCREMENTAL_MODES}, not {self.incremental_mode!r}")
        if self.min_image_bytes < 0:
            raise ValueError(f"min_image_bytes must be at least 0, not {self.min_image_bytes}")
        reserved = [c for c in self.save_additional_columns if c in RESERVED_COLUMNS]
        if reserved:
            raise ValueError(f"You cannot use in save_additional_columns the following columns: {set(reserved)}. "
                             "img2dataset reserves these columns for its own use, and so do we.")
        ours = [c for c in self.save_additional_columns if c in OUR_ROW_COLUMNS]
        if ours:
            raise ValueError(f"save_additional_columns cannot hold {ours}: the shards' rows have such columns already")
        self.verify()

    def verify(self) -> tuple[str, str] | None:
        """(column, algorithm) of verify_hash, or None."""
        if not self.verify_hash:
            return None
        col, _, algo = self.verify_hash.partition(",")
        col, algo = col.strip(), algo.strip().lower()
        if not col or algo not in HASHES[1:]:
            raise ValueError(f"verify_hash must be COL,ALGO with ALGO one of {HASHES[1:]}, not {self.verify_hash!r}")
        return col, algo

    def kept_columns(self) -> tuple[str, ...]:
        """The input columns each row carries: the additional ones and the boxes (saved), the hash (compared)."""
        verify = self.verify()
        return tuple(dict.fromkeys([*self.save_additional_columns, *([self.bbox_col] if self.bbox_col else []),
                                    *([verify[0]] if verify else [])]))

    def saved_columns(self) -> tuple[str, ...]:
        """The kept columns written to the rows (img2dataset leaves the verified hash column out)."""
        return tuple(dict.fromkeys([*self.save_additional_columns, *([self.bbox_col] if self.bbox_col else [])]))


# --- the CLIP stage --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings(FromEnv):
    """Which models the CLIP stage uses. `preset` small (offline, trained on the synthetic world and cached in
    models_dir) or laion (LAION-5B's); any other field set overrides the preset."""

    preset: str = setting("small", f"Model set: {' or '.join(MODEL_PRESETS)}.", env="LAION_ASSETS_MODELS")
    models_dir: str = setting(DEFAULT_MODELS_DIR, "Where the small offline models are built and cached, and where "
                                                  "`models fetch` puts the laion preset's files (in laion/).",
                              env="LAION_ASSETS_MODELS_DIR")
    clip_en_arch: str = setting("", "open_clip architecture of the English CLIP.")
    clip_en_pretrained: str = setting("", "Pretrained tag or checkpoint path of the English CLIP.")
    clip_multi_arch: str = setting("", "open_clip architecture of the multilingual CLIP.")
    clip_multi_pretrained: str = setting("", "Pretrained tag or checkpoint path of the multilingual CLIP.")
    embed_arch: str = setting("", "open_clip architecture of the embedding CLIP (ViT-L/14 in LAION).")
    embed_pretrained: str = setting("", "Pretrained tag or checkpoint path of the embedding CLIP.")
    threshold_en: float | None = setting(None, "Similarity threshold of English captions (default: the model's).")
    threshold_multi: float | None = setting(None, "Similarity threshold of other captions (default: the model's).")
    safety_head: str = setting("", "The safety head: LAION's AutoKeras zip or PyTorch port, or one train-safety "
                                   "wrote (recognised from the file).")
    aesthetic_head: str = setting("", "The aesthetic head: LAION-Aesthetics V2 or V1, or one of ours (recognised from "
                                      "the file).")
    concepts: str = setting("", "The concept filter's file (LAION's safety_settings.yml layout); none: no concept "
                                "filter.")
    rating_embeddings: str = setting("", "Folder of rating0..9.npy: the search's aesthetic_score embeddings.")
    violence_prompts: str = setting("", "The search's violence prompts (.npy, 2 x dim).")
    watermark_arch: str = setting("", "timm architecture of the watermark classifier.")
    watermark_checkpoint: str = setting("", "Checkpoint of the watermark classifier (train-watermark writes one).")
    watermark_image_size: int = setting(0, "Input size of the watermark classifier (0: the checkpoint's).")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (CUDA when present).")
    batch_size: int = setting(256, "Images per model batch.")
    decode_workers: int = setting(1, "DataLoader processes decoding the shards.")
    decode: str = setting("auto", "Where the CLIP pass decodes images: pil (the DataLoader workers), device (the "
                                  "model's device: nvJPEG on CUDA) or auto (device on CUDA, pil on CPU).")
    embed_precision: str = setting("fp16", "Weights of the embedding CLIP on CUDA: fp16, bf16 or fp8 (torchao's "
                                           "float8 matmuls; H100).")

    def __post_init__(self) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"preset must be one of {MODEL_PRESETS}, not {self.preset!r}")


@dataclass(frozen=True)
class ClipSettings:
    """The CLIP stage: the models, and whether a rerun may re-filter from stored similarities."""

    # When the bucket was scored before by the same weights on the same image bytes, only the keep flags are
    # recomputed from the stored similarities (a threshold change re-filters without touching an image).
    reuse_similarities: bool = setting(True, "Re-filter stored similarities when images and weights are unchanged.")
    models: ModelSettings = dataclasses.field(default_factory=ModelSettings)


# --- the release stage -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReleaseSettings:
    """Image and semantic dedup and the release's layout."""

    near_radius: int = setting(4, "Hamming radius (bits of the 64-bit pHash) within which images are near "
                                  "duplicates.")
    drop_exact_duplicates: bool = setting(True, "Leave samples whose image bytes an earlier sample has out of the "
                                                "release (they stay marked in filtered_metadata).")
    drop_near_duplicates: bool = setting(False, "Leave near duplicates out of the release too (default: marked only).")
    rows_per_part: int = setting(1_000_000, "Most rows in one release part.")
    dedup_partition_rows: int = setting(1_000_000, "Samples the image dedup holds in memory at once (it spills the "
                                                   "crawl to disk in partitions of about this size).")
    semantic_eps: float = setting(0.05, "Semantic dedup: two samples whose image embeddings have a cosine similarity "
                                        "of at least 1 - eps are semantic duplicates (SemDeDup's epsilon).")
    semantic_cluster_rows: int = setting(1_000, "Semantic dedup: samples per k-means cluster (the clusters are "
                                                "counted from the data: samples / this); pairs are compared within "
                                                "a cluster.")
    semantic_partition_rows: int = setting(200_000, "Samples the semantic dedup holds in memory at once (it spills "
                                                    "the crawl's embeddings to disk in partitions of about this "
                                                    "size).")
    drop_semantic_duplicates: bool = setting(False, "Leave semantic duplicates out of the release too (default: "
                                                    "marked only).")

    def __post_init__(self) -> None:
        if self.dedup_partition_rows < 1:
            raise ValueError(f"dedup_partition_rows must be at least 1, not {self.dedup_partition_rows}")
        if not 0 <= self.near_radius <= 16:
            raise ValueError(f"near_radius must be between 0 and 16 bits, not {self.near_radius}")
        if self.rows_per_part < 1:
            raise ValueError(f"rows_per_part must be at least 1, not {self.rows_per_part}")
        if not 0 < self.semantic_eps < 1:
            raise ValueError(f"semantic_eps must be between 0 and 1 (cosine >= 1 - eps), not {self.semantic_eps}")
        if self.semantic_cluster_rows < 2 or self.semantic_partition_rows < 1:
            raise ValueError("semantic_cluster_rows must be at least 2 and semantic_partition_rows at least 1, not "
                             f"{self.semantic_cluster_rows}, {self.semantic_partition_rows}")


def settings_hash(*settings: Any) -> str:
    """A short, stable hash of settings values (what changes an output), for completion markers."""
    import hashlib
    import json

    doc = [{"class": type(s).__name__, **dataclasses.asdict(s)} if dataclasses.is_dataclass(s) else s
           for s in settings]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- operations ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckSettings:
    """Bands outside which the non-blocking checks warn (the blocking ones have no knobs: wrong data never flows)."""

    min_success_rate: float = setting(0.2, "Download success rate under which image_shards warns.")
    max_success_rate: float = setting(1.0, "Download success rate over which image_shards warns.")
    min_kept_fraction: float = setting(0.05, "Kept fraction under which clip_scores warns.")
    max_kept_fraction: float = setting(0.95, "Kept fraction over which clip_scores warns.")


@dataclass(frozen=True)
class OperationsSettings(FromEnv):
    """How the deployment runs the graph: which definitions, which crawls are picked up, how often things are looked
    at. Read from the environment (`LAION_ASSETS_<FIELD>`) when the code location loads: schedules and sensors are
    fixed then."""

    deployment: str = setting("local", f"Which definitions the code location loads: {' or '.join(DEPLOYMENTS)} "
                                       "(local adds the demo's sample_crawl asset to production's).",
                              env="LAION_ASSETS_DEPLOYMENT")
    crawl_pattern: str = setting(r"CC-MAIN-\d{4}-\d{2}", "Regular expression (full match) of the crawl IDs the "
                                                           "new_crawls sensor registers, e.g. CC-MAIN-202[3-9]-.*",
                                 env="LAION_ASSETS_CRAWL_PATTERN")
    sensor_interval_s: int = setting(300, "Seconds between sensor evaluations.", env="LAION_ASSETS_SENSOR_INTERVAL_S")
    backfill_cron: str = setting("0 * * * *", "When crawl_backfill looks for missing and failed partitions.",
                                 env="LAION_ASSETS_BACKFILL_CRON")
    retry_delay_s: float = setting(30.0, "First delay of the retry policy of network-bound assets (doubles).",
                                   env="LAION_ASSETS_RETRY_DELAY_S")
    max_retries: int = setting(3, "Retries of a failed network-bound step within its run.",
                               env="LAION_ASSETS_MAX_RETRIES")
    retry_failed_after_h: float = setting(24.0, "Hours after a bucket's download that the retry_downloads sensor "
                                                "fetches its transient failures again (0: never).",
                                          env="LAION_ASSETS_RETRY_FAILED_AFTER_H")
    retry_failed_max_runs: int = setting(3, "Downloads a bucket's rows get in all, the first included: "
                                            "retry_downloads stops asking after that.",
                                         env="LAION_ASSETS_RETRY_FAILED_MAX_RUNS")
    retry_failed_per_tick: int = setting(20, "Retry runs retry_downloads requests at most per evaluation.",
                                         env="LAION_ASSETS_RETRY_FAILED_PER_TICK")
    executor: str = setting("in_process", "How a run executes its steps: in_process, multiprocess, or k8s (a pod "
                                          "per step, shaped by the assets' dagster-k8s/config tags).",
                            env="LAION_ASSETS_EXECUTOR")
    gpu_image: str = setting("", "Container image of GPU steps under the k8s executor (the CUDA build).",
                             env="LAION_ASSETS_GPU_IMAGE")
    dedup_lists_against_crawls: bool = setting(False, "Cross-crawl URL, image and semantic dedup compare a URL "
                                                      "list (crawl list-NAME) with the crawls and earlier lists "
                                                      "(default: a list is deduplicated within itself only).",
                                               env="LAION_ASSETS_DEDUP_LISTS_AGAINST_CRAWLS")

    def __post_init__(self) -> None:
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"deployment must be one of {DEPLOYMENTS}, not {self.deployment!r}")


# --- the kNN index and the search service ------------------------------------------------------------------

@dataclass(frozen=True)
class IndexSettings:
    """How the kNN indices are built (autofaiss) and measured, and what the service may use to query them."""

    build_memory: str = setting("4G", "Memory autofaiss may use while building (its current_memory_available).")
    query_memory: str = setting("2G", "Largest index autofaiss may choose: what one loaded index may take in RAM "
                                      "when queried (its max_index_memory_usage).")
    max_query_ms: float = setting(10.0, "Query time autofaiss tunes the index for (its max_index_query_time_ms).")
    target_recall: float = setting(0.95, "recall@10 an IVF index's nprobe is lowered to: the smallest nprobe "
                                         "reaching it on held-out queries (other than the measured ones), never "
                                         "above autofaiss's pick for max_query_ms (0: keep autofaiss's pick).")
    index_key: str = setting("", "faiss index factory string (empty: autofaiss picks one from the budgets).")
    cores: int = setting(0, "Threads used while building (0: every core).")
    eval_queries: int = setting(200, "Held-out queries measuring recall@10 against exact search and latency "
                                     "(0: no measurement).")
    merged_nlist: int = setting(0, "Inverted lists of the merged index (0: about 4 sqrt(vectors)).")
    merged_nprobe: int = setting(0, "Lists the merged index probes per query (0: the fewest reaching target_recall, "
                                       "from nlist / 8, at least 16, down).")
    seed: int = setting(0, "Seed of the held-out query sample and of the merged index's training sample.")
    min_recall: float = setting(0.8, "Floor of recall@10 (image and text) below which the knn_index and "
                                     "knn_index_all assets' blocking `recall` check fails.")


@dataclass(frozen=True)
class DecontaminationSettings(FromEnv):
    """Evaluation-set decontamination: what counts as a released sample being an evaluation image, and the
    evaluation sets the `decontamination` asset checks every crawl against."""

    phash_radius: int = setting(4, "Hamming radius (bits of the 64-bit pHash) within which a released image is an "
                                   "evaluation image (as near_radius for duplicates).")
    min_similarity: float = setting(0.95, "Image cosine (embedding CLIP) at or above which a released image is an "
                                          "evaluation image.")
    neighbours: int = setting(10, "Nearest indexed samples looked at per evaluation image.")
    eval_sets: tuple[str, ...] = setting((), "Registered evaluation sets, NAME=SOURCE (a folder of images, a "
                                             "webdataset or an embeddings folder; local or s3://): the "
                                             "decontamination asset checks each crawl against every one.",
                                         cli="--eval-set", env="LAION_ASSETS_EVAL_SETS")

    def __post_init__(self) -> None:
        if not 0 <= self.phash_radius <= 16:
            raise ValueError(f"phash_radius must be between 0 and 16 bits, not {self.phash_radius}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity is a cosine, between -1 and 1, not {self.min_similarity}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, not {self.neighbours}")
        for entry in self.eval_sets:
            name, _, source = entry.partition("=")
            if not name.strip() or not source.strip():
                raise ValueError(f"an evaluation set is NAME=SOURCE, not {entry!r}")

    def registered(self) -> dict[str, str]:
        """{name: source} of the registered evaluation sets."""
        return {e.partition("=")[0].strip(): e.partition("=")[2].strip() for e in self.eval_sets}


@dataclass(frozen=True)
class SweepSettings:
    """The neighbour sweep: indexed samples near what a removal list version removed, as candidates."""

    min_similarity: float = setting(0.9, "Image cosine at or above which an indexed sample is a candidate.")
    neighbours: int = setting(50, "Nearest indexed samples looked at per removed sample.")

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity is a cosine, between -1 and 1, not {self.min_similarity}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, not {self.neighbours}")


@dataclass(frozen=True)
class ServeSettings:
    """The search service: where it listens and what a request may ask of it."""

    host: str = setting("127.0.0.1", "Address the service listens on.")
    port: int = setting(1234, "Port the service listens on.")
    max_body_bytes: int = setting(20 * 1024 * 1024, "Largest request body accepted (uploaded images included).")
    max_results: int = setting(10_000, "Largest num_images / num_result_ids a query may ask for.")
    safety_threshold: float = setting(0.5, "punsafe above which use_safety_model hides a result.")
    dedup_threshold: float = setting(0.94, "Inner product above which deduplicate treats two results as one image.")
    image_fetch_bytes: int = setting(10 * 1024 * 1024, "Largest image_url body fetched.")
    image_fetch_deadline_s: float = setting(10.0, "Seconds an image_url fetch may take, all in.")
    allow_networks: tuple[str, ...] = setting((), "CIDR image_url may reach despite the address guard (repeatable).",
                                              cli="--allow-network")
    export_limit: int = setting(1_000_000, "Most rows one subset export may return.")
    inline_search_ms: float = setting(2.0, "Searches of an index averaging less than this many CPU ms run on the "
                                           "event loop itself; slower ones, dedup, over-100-result and on-disk "
                                           "(merged) index queries in worker threads: a thread hop costs about "
                                           "0.6 ms of CPU a request at hundreds of queries/s, more than a small IVF "
                                           "search (0: always threads).")
