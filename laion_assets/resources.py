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

import dataclasses
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from laion_assets.config import config_class
from laion_assets.core.crawl.source import s3_client_for
from laion_assets.core.paths import Layout
from laion_assets.core.settings import (
    DEFAULT_STORAGE,
    CheckSettings,
    FetchSettings,
    ModelSettings,
    OperationsSettings,
    SourceSettings,
    StorageSettings,
    build,
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
        return build(SourceSettings, self)

    def s3_client(self) -> Any:
        """The S3 client of an s3:// source, retrying each request as the settings say (None for other sources)."""
        if not self.base.startswith("s3://"):  # type: ignore[attr-defined]
            return None
        return s3_client_for(self.settings())


CrawlSourceResource = config_class("CrawlSourceResource", SourceSettings, base=_CrawlSource,
                                   doc="Where crawl files are read from, and how hard to try.")


class _ImageFetch(dg.ConfigurableResource):
    def settings(self) -> FetchSettings:
        return build(FetchSettings, self)


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

        return apply_overrides(build(ModelSettings, self), load_overrides(self.storage.get()))

    def model_set(self, needs: Any = True) -> Any:
        """The model set; a file of the laion preset that `needs` names (ModelSet fields; True: all) missing or
        wrong is an error naming `laion-assets models fetch`, before the asset does any work."""
        from laion_assets.core.clip.registry import resolve

        return resolve(self.settings(), needs)

    def versions(self) -> dict[str, str]:
        from laion_assets.core.clip.registry import versions

        return versions(self.settings())


ModelRegistryResource = config_class(
    "ModelRegistryResource", ModelSettings, base=_ModelRegistry,
    doc="Which models the CLIP stage uses: the preset, the fields set here, then the registry file's overrides.")


class _Checks(dg.ConfigurableResource):
    def settings(self) -> CheckSettings:
        return build(CheckSettings, self)


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


def _env_names(*classes: type) -> tuple[str, ...]:
    return tuple(n for cls in classes for f in dataclasses.fields(cls) for n in f.metadata.get("env", ()))


# Every environment variable the code reads (the production dagster.yaml passes each of them to run pods): the
# settings fields' own (`env` metadata), and the S3 credentials boto3 reads.
ENV_VARS = (*_env_names(StorageSettings, SourceSettings, Layout, ModelSettings, FetchSettings, OperationsSettings),
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
