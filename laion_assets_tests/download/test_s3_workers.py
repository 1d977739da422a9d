"""Download worker processes reach S3 with exactly the parent's S3 options (endpoint, region, credentials)."""

from __future__ import annotations

import io

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.download.distributor import run as download
from laion_assets.core.download.plan import read_manifest
from laion_assets.core.settings import DownloadSettings, FetchSettings, ResizeSettings
from laion_assets.core.storage import S3Options, Storage
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render


def test_worker_processes_get_the_credentials_of_the_storage(s3_server, loopback, tmp_path, monkeypatch):
    # No credentials anywhere but in the options: a worker that rebuilt its client from the endpoint alone (or
    # from the environment) would fail with NoCredentialsError.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    options = S3Options(endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="workers",
                        aws_secret_access_key="secret")
    options.client().create_bucket(Bucket="workers")
    for i in range(6):
        loopback.static(f"/{i}.jpg", jpeg_bytes(render(Scene("star", "red", "white", "top"), (200, 150), seed=i)))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{loopback.base}/{i}.jpg" for i in range(6)]}), urls)
    store = Storage("s3://workers/run", options)
    settings = DownloadSettings(samples_per_shard=2, processes=2, min_image_bytes=0,
                                resize=ResizeSettings(image_size=64),
                                fetch=FetchSettings(allow_networks=("127.0.0.1/32",), deadline_s=5.0))
    report = download(str(urls), store, "shards", settings)
    assert report.statuses["success"] == 6 and report.shards == 3
    manifest = read_manifest(store, "shards")
    assert [s.successes for s in manifest.shards] == [2, 2, 2]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="workers",
                          aws_secret_access_key="secret")
    rows = pq.read_table(io.BytesIO(client.get_object(Bucket="workers", Key="run/shards/00002.parquet")["Body"].read()))
    assert rows["status"].to_pylist() == ["success", "success"]


def test_worker_processes_get_the_environment_of_the_parent_as_it_is_now(s3_server, loopback, tmp_path, monkeypatch):
    # The forkserver outlives a download and keeps the environment it started with: start it while no
    # credentials exist, then give credentials through the environment only, as `AWS_*` variables usually are.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for i in range(4):
        loopback.static(f"/{i}.jpg", jpeg_bytes(render(Scene("star", "red", "white", "top"), (200, 150), seed=i)))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{loopback.base}/{i}.jpg" for i in range(4)]}), urls)
    settings = DownloadSettings(samples_per_shard=2, processes=2, min_image_bytes=0,
                                resize=ResizeSettings(image_size=64),
                                fetch=FetchSettings(allow_networks=("127.0.0.1/32",), deadline_s=5.0))
    assert download(str(urls), Storage(str(tmp_path / "local")), "shards", settings).statuses["success"] == 4
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "later")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    boto3.client("s3").create_bucket(Bucket="later")
    report = download(str(urls), Storage("s3://later/run"), "shards", settings)
    assert report.statuses["success"] == 4 and report.shards == 2
