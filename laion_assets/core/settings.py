"""Settings (and their defaults) of the stages, kept free of heavy imports so that the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from laion_assets.core.wat import USER_AGENT

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


@dataclass(frozen=True)
class FetchSettings:
    user_agent: str = USER_AGENT
    agent_token: str = "laion-assets"  # the robots.txt user-agent token we obey
    connections: int = 64
    per_host: int = 8
    connect_timeout_s: float = 10.0
    deadline_s: float = 30.0
    max_bytes: int = 25 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2
    backoff_s: float = 0.5
    max_retry_after_s: float = 30.0
    respect_robots_txt: bool = True
    respect_x_robots_tag: bool = True
    allow_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResizeSettings:
    image_size: int = 256
    resize_mode: str = "border"
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    max_pixels: int = 89_478_485  # Pillow's own bomb threshold; checked before any pixel is decoded
    keep_original: bool = False

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {sorted(ENCODE_FORMATS)}, not {self.encode_format!r}")


@dataclass(frozen=True)
class DownloadSettings:
    samples_per_shard: int = 10_000
    processes: int = 1
    resize_threads: int = 1
    in_flight: int = 256  # URLs being fetched or resized at once, per process
    fetch: FetchSettings = field(default_factory=FetchSettings)
    resize: ResizeSettings = field(default_factory=ResizeSettings)


@dataclass(frozen=True)
class ExtractSettings:
    """The extraction rules' parameters (LAION-5B's values by default)."""

    min_text_length: int = 5
    max_text_length: int = 1000
    drop_extensions: tuple[str, ...] = (".svg", ".svgz", ".gif")
    # Alt texts repeat a lot within a crawl ("logo", product names); cleaning and language ID are pure
    # functions of the raw text, so their results are cached per process.
    text_cache_size: int = 200_000


SAMPLE_CRAWL = "CC-MAIN-2099-01"
DEFAULT_IMAGE_BASE = "http://127.0.0.1:8765/"


@dataclass(frozen=True)
class SampleSettings:
    crawl: str = SAMPLE_CRAWL
    image_base_url: str = DEFAULT_IMAGE_BASE
    wat_files: int = 4
    pages_per_file: int = 30
    images_per_page: int = 5
    seed: int = 0
