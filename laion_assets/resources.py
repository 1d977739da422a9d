"""Resources: the storage root and the crawl source. Local by default; S3 by configuration.

`LAION_ASSETS_STORAGE` (default `data`) may be `s3://bucket/prefix`; the S3 client comes from
dagster-aws's S3Resource, so the usual AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) apply.
`LAION_ASSETS_SOURCE` (default the sample mirror `data/sample-mirror`) may be `s3://commoncrawl`,
`https://data.commoncrawl.org` or a local mirror directory.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from laion_assets.core.settings import FetchSettings
from laion_assets.core.storage import Storage
from laion_assets.core.wat import DEFAULT_SOURCE, SourceSettings

DEFAULT_STORAGE = "data"


class StorageResource(dg.ConfigurableResource):
    """Where every stage writes: a local directory or `s3://bucket/prefix`."""

    root: str = DEFAULT_STORAGE
    s3: S3Resource

    def get(self) -> Storage:
        client = self.s3.get_client() if self.root.startswith("s3://") else None
        return Storage(self.root, client)


class CrawlSourceResource(dg.ConfigurableResource):
    """Where crawl files are read from."""

    base: str = DEFAULT_SOURCE
    retries: int = SourceSettings.retries
    timeout_s: float = SourceSettings.timeout_s

    def settings(self) -> SourceSettings:
        return SourceSettings(base=self.base, retries=self.retries, timeout_s=self.timeout_s)

    def s3_client(self) -> Any:
        if not self.base.startswith("s3://"):
            return None
        import boto3

        return boto3.client("s3")


class ImageFetchResource(dg.ConfigurableResource):
    """How images are fetched: politeness and safety are deployment settings, on by default.

    `allow_networks` exempts CIDRs from the address guard (the demo's image server on 127.0.0.1); from
    `LAION_ASSETS_ALLOW_NETWORKS` (comma-separated) by default."""

    user_agent: str = FetchSettings.user_agent
    agent_token: str = FetchSettings.agent_token
    connections: int = FetchSettings.connections
    per_host: int = FetchSettings.per_host
    deadline_s: float = FetchSettings.deadline_s
    max_bytes: int = FetchSettings.max_bytes
    retries: int = FetchSettings.retries
    allow_networks: list[str] = []

    def settings(self) -> FetchSettings:
        return FetchSettings(user_agent=self.user_agent, agent_token=self.agent_token, connections=self.connections,
                             per_host=self.per_host, deadline_s=self.deadline_s, max_bytes=self.max_bytes,
                             retries=self.retries, allow_networks=tuple(self.allow_networks))


class ModelRegistryResource(dg.ConfigurableResource):
    """Which models the CLIP stage uses. `preset` "small" (default): the offline set, trained on the synthetic
    world and cached in `models_dir` on first use. "laion": LAION-5B's models (open_clip downloads B/32,
    the multilingual B/32 and L/14 when first loaded; the two heads need checkpoint paths). Any field set
    here overrides the preset; a CLIP is an open_clip architecture plus a pretrained tag or checkpoint path."""

    preset: str = "small"
    models_dir: str = "data/models"
    clip_en_arch: str = ""
    clip_en_pretrained: str = ""
    clip_multi_arch: str = ""
    clip_multi_pretrained: str = ""
    embed_arch: str = ""
    embed_pretrained: str = ""
    threshold_en: float | None = None
    threshold_multi: float | None = None
    safety_head: str = ""
    watermark_arch: str = ""
    watermark_checkpoint: str = ""
    watermark_image_size: int = 0
    device: str = "auto"
    batch_size: int = 256
    decode_workers: int = 1

    def model_set(self, log: Any = None) -> Any:
        import dataclasses

        from laion_assets.core import clip, models, tags

        if self.preset == "small":
            base = models.small_models(self.models_dir, log)
        elif self.preset == "laion":
            base = models.ModelSet(clip.LAION_EN, clip.LAION_MULTI, clip.LAION_EMBED, self.safety_head,
                                   dataclasses.replace(tags.LAION_WATERMARK, checkpoint=self.watermark_checkpoint))
        else:
            raise ValueError(f"preset must be 'small' or 'laion', not {self.preset!r}")

        def clip_of(spec: Any, arch: str, pretrained: str, threshold: float | None) -> Any:
            changed = arch or pretrained
            spec = dataclasses.replace(spec, arch=arch or spec.arch, pretrained=pretrained or spec.pretrained)
            if changed:
                spec = dataclasses.replace(spec, name=f"{spec.arch}/{os.path.basename(spec.pretrained)}")
            return spec if threshold is None else dataclasses.replace(spec, threshold=threshold)

        watermark = base.watermark
        if self.watermark_arch or self.watermark_checkpoint or self.watermark_image_size:
            watermark = dataclasses.replace(
                watermark, arch=self.watermark_arch or watermark.arch,
                checkpoint=self.watermark_checkpoint or watermark.checkpoint,
                image_size=self.watermark_image_size or watermark.image_size)
        return models.ModelSet(
            clip_en=clip_of(base.clip_en, self.clip_en_arch, self.clip_en_pretrained, self.threshold_en),
            clip_multi=clip_of(base.clip_multi, self.clip_multi_arch, self.clip_multi_pretrained, self.threshold_multi),
            embed=clip_of(base.embed, self.embed_arch, self.embed_pretrained, None),
            safety_head=self.safety_head or base.safety_head,
            watermark=watermark,
        )

    def torch_device(self) -> Any:
        from laion_assets.core.clip import pick_device

        return pick_device(self.device)


def resources_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resources for this environment: local paths unless the variables say otherwise."""
    env = dict(os.environ if env is None else env)
    s3 = S3Resource(endpoint_url=env.get("AWS_ENDPOINT_URL") or None)
    return {
        "storage": StorageResource(root=env.get("LAION_ASSETS_STORAGE", DEFAULT_STORAGE), s3=s3),
        "crawl_source": CrawlSourceResource(base=env.get("LAION_ASSETS_SOURCE", DEFAULT_SOURCE)),
        "models": ModelRegistryResource(
            preset=env.get("LAION_ASSETS_MODELS", "small"),
            models_dir=env.get("LAION_ASSETS_MODELS_DIR", "data/models"),
        ),
        "image_fetch": ImageFetchResource(
            allow_networks=[n.strip() for n in env.get("LAION_ASSETS_ALLOW_NETWORKS", "").split(",") if n.strip()]
        ),
    }
