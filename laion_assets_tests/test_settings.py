"""One settings dataclass per stage: the CLI options and the Dagster config and resources offer the same fields
with the same defaults, and build the same settings objects."""

from __future__ import annotations

import dataclasses

import pytest

from laion_assets.assets.clip import ScoreConfig
from laion_assets.assets.crawl import ExtractConfig
from laion_assets.assets.decontamination import DecontaminationConfig
from laion_assets.assets.download import DownloadConfig, download_settings
from laion_assets.cli import main
from laion_assets.core.settings import (
    CheckSettings,
    ClipSettings,
    DecontaminationSettings,
    DownloadSettings,
    ExtractSettings,
    FetchSettings,
    ModelSettings,
    ResizeSettings,
    SampleSettings,
    SourceSettings,
    SweepSettings,
    build,
    scalar_fields,
    settings_hash,
)
from laion_assets.offline.assets import SampleCrawlConfig
from laion_assets.resources import ChecksResource, CrawlSourceResource, ImageFetchResource, ModelRegistryResource

COMMANDS = {
    ("extract",): [ExtractSettings, (SourceSettings, ("base",))],
    ("sample-crawl",): [SampleSettings],
    ("download",): [DownloadSettings, ResizeSettings, FetchSettings],
    ("clip", "run"): [ClipSettings, ModelSettings],
    ("clip", "score"): [ClipSettings, ModelSettings],
    ("clip", "embed"): [ModelSettings],
    ("clip", "safety"): [ModelSettings],
    ("clip", "watermark"): [ModelSettings],
    ("decontaminate",): [(DecontaminationSettings, ("eval_sets",)),
                         (ResizeSettings, ("min_image_size", "max_aspect_ratio", "keep_original"))],
    ("removals", "sweep"): [SweepSettings],
}
CONFIGS = [
    (ExtractConfig, [ExtractSettings]), (SampleCrawlConfig, [SampleSettings]),
    (DownloadConfig, [DownloadSettings, ResizeSettings]), (ScoreConfig, [ClipSettings]),
    (CrawlSourceResource, [SourceSettings]), (ImageFetchResource, [FetchSettings]),
    (ModelRegistryResource, [ModelSettings]), (ChecksResource, [CheckSettings]),
    (DecontaminationConfig, [DecontaminationSettings]),
]


def command(path: tuple[str, ...]):
    import click

    cmd = main
    for name in path:
        cmd = cmd.get_command(click.Context(cmd), name)
    return cmd


def normalized(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_cli_options_are_the_settings_fields(path):
    params = {p.name: p for p in command(path).params}
    for entry in COMMANDS[path]:
        cls, exclude = entry if isinstance(entry, tuple) else (entry, ())
        for field in scalar_fields(cls):
            if field.name in exclude:
                assert field.name not in params
                continue
            assert field.name in params, f"{' '.join(path)} has no option for {cls.__name__}.{field.name}"
            assert normalized(params[field.name].default) == normalized(field.default), field.name
            assert params[field.name].help == field.metadata["help"]


@pytest.mark.parametrize(("config", "classes"), CONFIGS, ids=lambda x: getattr(x, "__name__", ""))
def test_dagster_config_fields_are_the_settings_fields(config, classes):
    # Nested resources (the model registry reads its overrides from the storage root) are not settings.
    fields = {n: f for n, f in config.model_fields.items() if n != "storage"}
    expected = {f.name: f for cls in classes for f in scalar_fields(cls)}
    assert set(fields) == set(expected)
    for name, field in expected.items():
        assert normalized(fields[name].default) == normalized(field.default), name
        assert fields[name].description == field.metadata["help"]


def test_defaults_build_the_default_settings():
    assert download_settings(DownloadConfig(), ImageFetchResource()) == DownloadSettings()
    assert build(ExtractSettings, ExtractConfig()) == ExtractSettings()
    assert ChecksResource().settings() == CheckSettings()
    assert CrawlSourceResource().settings() == SourceSettings()
    # A list in the launchpad is a tuple in the settings (hashable, frozen).
    fetch = ImageFetchResource(allow_networks=["127.0.0.1/32"]).settings()
    assert fetch.allow_networks == ("127.0.0.1/32",)


def test_the_cli_builds_the_settings_it_is_given(tmp_path, monkeypatch):
    seen = {}

    def fake_download(urls, store, prefix, settings, columns, progress, log):
        seen["settings"] = settings
        raise ValueError("stop here")

    monkeypatch.setattr("laion_assets.core.download.distributor.run", fake_download)
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["download", "u.parquet", "-o", str(tmp_path), "--deadline", "7",
                                       "--image-size", "128", "--allow-network", "127.0.0.1/32", "--no-respect-tdmrep",
                                       "--processes", "3"])
    assert "stop here" in result.output
    expected = DownloadSettings(processes=3, resize=ResizeSettings(image_size=128),
                                fetch=FetchSettings(deadline_s=7, allow_networks=("127.0.0.1/32",),
                                                    respect_tdmrep=False))
    assert seen["settings"] == expected


def test_bad_values_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        ResizeSettings(resize_mode="squash")
    with pytest.raises(ValueError, match="preset must be one of"):
        ModelSettings(preset="huge")


def test_settings_hash_changes_with_what_changes_the_output():
    base = settings_hash(ResizeSettings())
    assert base == settings_hash(ResizeSettings())
    for change in ({"image_size": 128}, {"resize_mode": "center_crop"}, {"encode_format": "webp"},
                   {"encode_quality": 90}):
        assert settings_hash(dataclasses.replace(ResizeSettings(), **change)) != base


def test_from_env_reads_each_field_type_and_names_a_bad_variable():
    from laion_assets.core.paths import Layout
    from laion_assets.core.settings import OperationsSettings, StorageSettings, from_env

    env = {"LAION_ASSETS_CHUNKS": "512", "LAION_ASSETS_ALLOW_NETWORKS": " 10.0.0.0/8, 127.0.0.1/32 ,",
           "LAION_ASSETS_RETRY_DELAY_S": "2.5", "LAION_ASSETS_MODELS": "laion", "AWS_REGION": "",
           "AWS_DEFAULT_REGION": "us-east-1"}
    assert from_env(Layout, env) == Layout(chunks=512)
    assert from_env(FetchSettings, env).allow_networks == ("10.0.0.0/8", "127.0.0.1/32")
    assert from_env(OperationsSettings, env).retry_delay_s == 2.5
    assert from_env(ModelSettings, env).preset == "laion"
    # An empty variable is an unset one: the next name in line, or the default.
    assert from_env(StorageSettings, env).region == "us-east-1"
    assert from_env(FetchSettings, {"LAION_ASSETS_ALLOW_NETWORKS": ""}).allow_networks == ()
    with pytest.raises(ValueError, match="LAION_ASSETS_BUCKETS='many'"):
        from_env(Layout, {"LAION_ASSETS_BUCKETS": "many"})
    with pytest.raises(ValueError, match="deployment must be one of"):
        from_env(OperationsSettings, {"LAION_ASSETS_DEPLOYMENT": "staging"})


def test_every_operations_setting_is_read_from_its_variable():
    from laion_assets.core.settings import OperationsSettings

    for field in scalar_fields(OperationsSettings):
        assert field.metadata.get("env") == (f"LAION_ASSETS_{field.name.upper()}",), field.name
