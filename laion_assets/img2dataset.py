"""img2dataset's interface on our download stage: `download(**kwargs)` takes img2dataset 1.47's parameters, names,
defaults and meanings, so that a script calling `img2dataset.download(...)` (DataComp's download_upstream.py) or a
documented `img2dataset --url_list ...` command works with the module or program name changed.

What differs is said where it happens (docs/img2dataset.md has the whole table): politeness (robots.txt, TDMRep,
X-Robots-Tag) and the address guard stay on; `thread_count` becomes the requests in flight per process;
`timeout` the connect and read-gap timeout, with our per-URL deadline on top; a parameter we cannot honour
(`distributor="pyspark"` or `"ray"`, `enable_wandb=True`, another interpolation) is refused by name with what to
use instead, before anything is downloaded. The guard's exceptions apply as to `laion-assets download`:
`LAION_ASSETS_ALLOW_NETWORKS`, or our own keyword `allow_networks`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from laion_assets.core.download.distributor import run as run_download
from laion_assets.core.download.inputs import InputError, check_format
from laion_assets.core.download.reader import InputColumns
from laion_assets.core.download.report import DownloadReport
from laion_assets.core.settings import (
    DownloadSettings,
    FetchSettings,
    ResizeSettings,
)
from laion_assets.core.storage import Storage

# img2dataset 1.47's download() parameters and defaults (img2dataset/main.py at its 1.47.0 release).
DEFAULTS: dict[str, Any] = {
    "image_size": 256, "output_folder": "images", "processes_count": 1, "resize_mode": "border",
    "resize_only_if_bigger": False, "upscale_interpolation": "lanczos", "downscale_interpolation": "area",
    "encode_quality": 95, "encode_format": "jpg", "skip_reencode": False, "output_format": "files",
    "input_format": "txt", "url_col": "url", "caption_col": None, "bbox_col": None, "thread_count": 256,
    "number_sample_per_shard": 10000, "extract_exif": True, "save_additional_columns": None, "timeout": 10,
    "enable_wandb": False, "wandb_project": "img2dataset", "oom_shard_count": 5, "compute_hash": "sha256",
    "verify_hash": None, "distributor": "multiprocessing", "subjob_size": 1000, "retries": 0,
    "disable_all_reencoding": False, "min_image_size": 0, "max_image_area": float("inf"),
    "max_aspect_ratio": float("inf"), "incremental_mode": "incremental", "max_shard_retry": 1,
    "user_agent_token": None, "disallowed_header_directives": None,
}
PARAMETERS = ("url_list", *DEFAULTS)
OUR_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


class UnsupportedParameter(ValueError):
    """An img2dataset parameter value we cannot honour; the message says what to use instead."""


def _refuse(name: str, value: Any, instead: str) -> None:
    raise UnsupportedParameter(f"img2dataset parameter {name}={value!r} is not supported by laion-assets: {instead}")


def settings_from(params: dict[str, Any], allow_networks: tuple[str, ...] = (),
                  ) -> tuple[DownloadSettings, InputColumns]:
    """Our settings for img2dataset's parameters (all of them present: DEFAULTS filled in)."""
    p = params
    if p["distributor"] != "multiprocessing":
        _refuse("distributor", p["distributor"], "we run worker processes on one machine (processes_count); to spread "
                "a list over machines, run the crawl graph's image_shards asset (a partition per bucket, on the k8s "
                "executor) or one command per part of the list")
    if p["enable_wandb"]:
        _refuse("enable_wandb", True, "progress goes to stderr and every shard's _stats.json; the Dagster UI shows "
                "the graph's downloads (drop enable_wandb)")
    if p["upscale_interpolation"] != "lanczos" or p["downscale_interpolation"] != "area":
        _refuse("upscale_interpolation/downscale_interpolation",
                (p["upscale_interpolation"], p["downscale_interpolation"]),
                "we resize with area averaging to shrink and Lanczos to enlarge (img2dataset's defaults) only")
    if p["compute_hash"] not in (None, "md5", "sha256", "sha512"):
        raise ValueError(f"Unsupported hash to compute: {p['compute_hash']}")
    verify = p["verify_hash"]
    if verify is not None:
        if isinstance(verify, str):
            verify = [v.strip() for v in verify.split(",")]
        col, algo = verify
        if algo != p["compute_hash"]:  # img2dataset's own rule
            raise ValueError(f"verify_hash and compute_hash must be the same but got {algo} and {p['compute_hash']}")
    directives = p["disallowed_header_directives"]
    if directives is not None and len(directives) and not {d.strip().lower() for d in directives} <= OUR_DIRECTIVES:
        _refuse("disallowed_header_directives", directives, f"we honour X-Robots-Tag's {sorted(OUR_DIRECTIVES)}; pass "
                "[] to ignore the header, or None for these")
    check_format(p["input_format"])
    env = FetchSettings.from_env()
    fetch = dataclasses.replace(
        env,
        connections=int(p["thread_count"]),
        # thread_count threads each hold a connection; our in-flight requests per process are the same number.
        connect_timeout_s=float(p["timeout"]),
        retries=int(p["retries"]),
        respect_x_robots_tag=not (directives is not None and len(directives) == 0),
        allow_networks=tuple(dict.fromkeys([*env.allow_networks, *allow_networks])),
        **({"agent_token": p["user_agent_token"].strip().lower()} if p["user_agent_token"] else {}),
    )
    max_area = p["max_image_area"]
    resize = ResizeSettings(
        image_size=int(p["image_size"]), resize_mode=p["resize_mode"], encode_format=p["encode_format"],
        encode_quality=int(p["encode_quality"]), min_image_size=int(p["min_image_size"]),
        max_aspect_ratio=0.0 if math.isinf(float(p["max_aspect_ratio"])) else float(p["max_aspect_ratio"]),
        # Our pixel budget stays the ceiling: it is checked from the header, before any decoding.
        max_pixels=ResizeSettings().max_pixels if math.isinf(float(max_area))
        else min(int(max_area), ResizeSettings().max_pixels),
        resize_only_if_bigger=bool(p["resize_only_if_bigger"]), skip_reencode=bool(p["skip_reencode"]),
        disable_all_reencoding=bool(p["disable_all_reencoding"]))
    saved = tuple(p["save_additional_columns"] or ())
    settings = DownloadSettings(
        samples_per_shard=int(p["number_sample_per_shard"]), processes=int(p["processes_count"]),
        in_flight=max(2 * int(p["thread_count"]), 1),  # img2dataset's semaphore: twice the threads
        output_format=_output_format(p["output_format"]), save_additional_columns=saved,
        compute_hash=p["compute_hash"] or "none", verify_hash=f"{verify[0]},{verify[1]}" if verify else "",
        bbox_col=p["bbox_col"] or "", extract_exif=bool(p["extract_exif"]), incremental_mode=p["incremental_mode"],
        shard_digits=int(p["oom_shard_count"]), min_image_bytes=0, fetch=fetch, resize=resize)
    # caption_col None: img2dataset stores no caption; a column name nobody has reads as empty captions.
    columns = InputColumns(url=p["url_col"], caption=p["caption_col"] or "",
                           input_format=p["input_format"])
    return settings, columns


def _output_format(name: str) -> str:
    if name in ("tfrecord", "dummy"):
        _refuse("output_format", name, "use webdataset, files or parquet")
    return name


def download(url_list: str, allow_networks: tuple[str, ...] | list[str] = (),
             log: Callable[[str], None] | None = print, **kwargs: Any) -> DownloadReport:
    """img2dataset.download's parameters (1.47); returns our report (img2dataset returns None)."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"download() got unexpected keyword argument(s) {unknown} (img2dataset 1.47's are: "
                        f"{', '.join(PARAMETERS)})")
    params = {**DEFAULTS, **kwargs}
    settings, columns = settings_from(params, tuple(allow_networks))
    output = str(params["output_folder"])
    store = Storage(output.rstrip("/") if output.startswith("s3://") else os.path.abspath(output))
    attempts = max(1, int(params["max_shard_retry"]))
    attempt = 1
    while True:
        try:
            report = run_download(url_list, store, "", settings, columns, log=log)
            break
        except InputError:
            raise
        except (OSError, RuntimeError) as err:
            # img2dataset retries failed shards max_shard_retry times; ours resume where the failure left them
            # (a retry resumes: it neither empties the folder again nor adds the shards again).
            if attempt >= attempts:
                raise
            attempt += 1
            if log:
                log(f"download failed ({err}); retrying the shards not complete (try {attempt} of {attempts})")
            settings = dataclasses.replace(settings, incremental_mode="incremental")
    if log:
        log(f"{output}: {report.summary()}")
    return report


def parse_command_line(args: list[str]) -> dict[str, Any]:
    """img2dataset's command line (python-fire's): `--name value`, `--name=value`, `--flag` (True), `--noflag`
    (False); values are Python literals when they parse as one (`'["uid"]'`, `10`, `True`, `None`), else text."""
    import ast

    def value(text: str) -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    params: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: img2dataset's parameters are --name value")
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            params[name] = value(text)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            params[name] = value(args[i + 1])
            i += 1
        elif name.startswith("no") and name[2:] in DEFAULTS:
            params[name[2:]] = False
        else:
            params[name] = True
        i += 1
    unknown = sorted(set(params) - set(PARAMETERS) - {"allow_networks"})
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join('--' + u for u in unknown)} (img2dataset 1.47's are: "
                         f"{', '.join('--' + p for p in PARAMETERS)})")
    if "url_list" not in params:
        raise ValueError("--url_list is required")
    return params
