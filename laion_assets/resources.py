"""Resources: the storage root, the crawl source, image fetching and the model registry. Local by default; S3 and
production models by configuration.

`LAION_ASSETS_STORAGE` (default `data`) may be `s3://bucket/prefix`; S3 is reached with dagster-aws's S3Resource
settings (endpoint, region, credentials), which the storage hands on to worker processes, so the usual AWS
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) apply. `LAION_ASSETS_SOURCE` (default the sample mirror
`data/sample-mirror`) may be `s3://commoncrawl`, `https://data.commoncrawl.org` or a local mirror directory.

The fields of the crawl source, image fetch and model resources are generated from the stages' settings
dataclasses (`core/settings.py`), as the CLI's options are.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from laion_assets.config import config_class, settings_from
from laion_assets.core.crawl.source import s3_client_for
from laion_assets.core.paths import Layout
from laion_assets.core.settings import (
    DEFAULT_STORAGE,
    CheckSettings,
    FetchSettings,
    ModelSettings,
    OperationsSettings,
    SourceSettings,
    scalar_fields,
)
from laion_assets.core.storage import S3Options, Storage


class StorageResource(dg.ConfigurableResource):
    """Where every stage writes: a local directory or `s3://bucket/prefix`."""

    root: str = DEFAULT_STORAGE
    s3: S3Resource

    def s3_options(self) -> S3Options:
        s3 = self.s3
        return S3Options(endpoint_url=s3.endpoint_url, region_name=s3.region_name,
                         aws_access_key_id=s3.aws_access_key_id, aws_secret_access_key=s3.aws_secret_access_key,
                         aws_session_token=s3.aws_session_token, profile_name=s3.profile_name,
                         use_ssl=s3.use_ssl, verify=s3.verify, max_attempts=s3.max_attempts)

    def get(self) -> Storage:
        return Storage(self.root, self.s3_options())


class _CrawlSource(dg.ConfigurableResource):
    def settings(self) -> SourceSettings:
        return settings_from(SourceSettings, self)

    def s3_client(self) -> Any:
        """The S3 client of an s3:// source, retrying each request as the settings say (None for other sources)."""
        if not self.base.startswith("s3://"):  # type: ignore[attr-defined]
            return None
        return s3_client_for(self.settings())


CrawlSourceResource = config_class("CrawlSourceResource", SourceSettings, base=_CrawlSource,
                                   doc="Where crawl files are read from, and how hard to try.")


class _ImageFetch(dg.ConfigurableResource):
    def settings(self) -> FetchSettings:
        return settings_from(FetchSettings, self)


ImageFetchResource = config_class(
    "ImageFetchResource", FetchSettings, base=_ImageFetch,
    doc="How images are fetched: politeness and safety are deployment settings, on by default. `allow_networks` "
        "exempts CIDRs from the address guard (the demo's image server on 127.0.0.1); from "
        "`LAION_ASSETS_ALLOW_NETWORKS` (comma-separated) by default.")


class _ModelRegistry(dg.ConfigurableResource):
    # The registry file under the storage root (`laion-assets models set`) overrides these fields at run time.
    storage: StorageResource

    def settings(self) -> ModelSettings:
        from laion_assets.core.clip.registry import apply_overrides, load_overrides

        return apply_overrides(settings_from(ModelSettings, self), load_overrides(self.storage.get()))

    def model_set(self, log: Any = None) -> Any:
        from laion_assets.core.clip.registry import resolve

        return resolve(self.settings(), log)

    def versions(self) -> dict[str, str]:
        from laion_assets.core.clip.registry import versions

        return versions(self.settings())


ModelRegistryResource = config_class(
    "ModelRegistryResource", ModelSettings, base=_ModelRegistry,
    doc="Which models the CLIP stage uses: the preset, the fields set here, then the registry file's overrides.")


class _Checks(dg.ConfigurableResource):
    def settings(self) -> CheckSettings:
        return settings_from(CheckSettings, self)


ChecksResource = config_class("ChecksResource", CheckSettings, base=_Checks)


class RemovalListResource(dg.ConfigurableResource):
    """The removal list under the storage root (`laion-assets removals add`): its latest version is the data version
    of the `removal_list` source, and what the release stage applies."""

    storage: StorageResource

    def version(self) -> str:
        from laion_assets.core.release.removals import current_version

        return current_version(self.storage.get())

    def load(self) -> Any:
        from laion_assets.core.release.removals import load

        return load(self.storage.get())


# Every environment variable the code reads (the production dagster.yaml passes each of them to run pods).
ENV_VARS = ("LAION_ASSETS_STORAGE", "LAION_ASSETS_SOURCE", "LAION_ASSETS_CHUNKS", "LAION_ASSETS_BUCKETS",
            "LAION_ASSETS_MODELS", "LAION_ASSETS_MODELS_DIR", "LAION_ASSETS_ALLOW_NETWORKS",
            *(f"LAION_ASSETS_{f.name.upper()}" for f in scalar_fields(OperationsSettings)),
            "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN")


def resources_from_env(env: dict[str, str] | None = None, layout: Layout | None = None) -> dict[str, Any]:
    """The resources for this environment: local paths unless the variables say otherwise."""
    from laion_assets.io_manager import StorageIOManager

    env = dict(os.environ if env is None else env)
    layout = layout or Layout.from_env(env)
    s3 = S3Resource(endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
                    region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)
    storage = StorageResource(root=env.get("LAION_ASSETS_STORAGE", DEFAULT_STORAGE), s3=s3)
    return {
        "storage": storage,
        "io_manager": StorageIOManager(storage=storage, chunks=layout.chunks, buckets=layout.buckets),
        "crawl_source": CrawlSourceResource(base=env.get("LAION_ASSETS_SOURCE", SourceSettings.base)),
        "models": ModelRegistryResource(storage=storage, preset=ModelSettings.from_env(env).preset,
                                        models_dir=ModelSettings.from_env(env).models_dir),
        "image_fetch": ImageFetchResource(
            allow_networks=[n.strip() for n in env.get("LAION_ASSETS_ALLOW_NETWORKS", "").split(",") if n.strip()]),
        "check_bands": ChecksResource(),
        "removals": RemovalListResource(storage=storage),
    }
