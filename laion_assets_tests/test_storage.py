"""The storage helper: atomic, durable writes with normal permissions; S3 options that survive pickling."""

from __future__ import annotations

import os
import pickle
import stat

import pyarrow as pa
import pytest

from laion_assets.core import storage as storage_module
from laion_assets.core.storage import LocalStorage, S3Options, S3Storage, Storage, atomic_path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_committed_files_get_the_permissions_open_would_give(tmp_path, umask_022, monkeypatch):
    # The mode is read from the process once; a test-set umask must be seen the same way.
    monkeypatch.setattr(storage_module, "_FILE_MODE", 0o666 & ~0o022)
    store = Storage(str(tmp_path / "root"))
    store.write_bytes("a/b.json", b"{}")
    store.write_parquet("a/c.parquet", pa.table({"x": [1]}))
    with store.staging_dir() as stage:
        local = os.path.join(stage, "d.bin")
        with open(local, "wb") as fh:
            fh.write(b"x")
        os.chmod(local, 0o600)  # as tempfile.mkstemp leaves a staging file
        store.put_file(local, "a/d.bin")
    for name in ("b.json", "c.parquet", "d.bin"):
        assert mode(tmp_path / "root/a" / name) == 0o644, name
    assert not [p for p in (tmp_path / "root/a").iterdir() if p.name.startswith(".tmp")]


def test_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert storage_module._current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what the test set
    finally:
        os.umask(before)


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    Storage(str(tmp_path)).write_bytes("x.bin", b"data")
    # The file's data before the rename, its directory after it.
    assert calls == ["fsync", "rename", "fsync"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    store = Storage(str(tmp_path))
    store.write_bytes("x.bin", b"old")

    def broken(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("x.bin", b"new")
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_storage_pickles_with_its_s3_options_and_without_a_client():
    options = S3Options(endpoint_url="http://127.0.0.1:8333", region_name="eu-west-1", aws_access_key_id="k",
                        aws_secret_access_key="s", aws_session_token="t")
    store = Storage("s3://bucket/prefix", options)
    assert store.s3.meta.region_name == "eu-west-1"  # a client exists in this process
    copy = pickle.loads(pickle.dumps(store))
    assert copy.s3_options == options and copy._s3 is None
    assert copy.s3.meta.endpoint_url == "http://127.0.0.1:8333"
    credentials = copy.s3._request_signer._credentials
    assert (credentials.access_key, credentials.secret_key, credentials.token) == ("k", "s", "t")


@pytest.mark.parametrize("key", ["/etc/passwd", "../x", "a/../../x"])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(ValueError, match="relative paths"):
        Storage(str(tmp_path)).write_bytes(key, b"x")


def test_parquet_rows_on_s3_read_the_footer_not_the_object(s3_server, monkeypatch, tmp_path):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="footer")
    store = Storage("s3://footer/root", S3Options(endpoint_url=s3_server))
    table = pa.table({"x": list(range(50_000)), "s": [f"row {i} " * 5 for i in range(50_000)]})
    store.write_parquet("t.parquet", table)
    store.write_bytes("not.parquet", b"hello, not parquet")
    fetched = []
    get_object = store.s3.get_object
    monkeypatch.setattr(store.s3, "get_object", lambda **kw: fetched.append(kw) or get_object(**kw))
    assert store.parquet_rows("t.parquet") == 50_000
    assert len(fetched) == 2 and all(kw["Range"].startswith("bytes=-") for kw in fetched)
    with pytest.raises(ValueError, match="not a Parquet file"):
        store.parquet_rows("not.parquet")


def test_storage_picks_its_backend_from_the_root(tmp_path):
    assert isinstance(Storage(str(tmp_path)), LocalStorage)
    assert isinstance(Storage("s3://bucket/prefix"), S3Storage)
    assert isinstance(pickle.loads(pickle.dumps(Storage(str(tmp_path)))), LocalStorage)
    with pytest.raises(ValueError, match="names no bucket"):
        Storage("s3://")


def test_atomic_path_commits_what_a_path_writer_wrote_or_nothing(tmp_path, umask_022, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(storage_module, "_FILE_MODE", 0o666 & ~0o022)
    dest = tmp_path / "sub" / "t.parquet"
    with atomic_path(dest) as tmp:
        assert os.path.dirname(tmp) == str(dest.parent) and not dest.exists()
        pq.write_table(pa.table({"x": [1, 2]}), tmp)
    assert pq.read_table(dest)["x"].to_pylist() == [1, 2] and mode(dest) == 0o644
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(dest) as tmp:
        pq.write_table(pa.table({"x": [3]}), tmp)
        raise RuntimeError("writer died")
    assert pq.read_table(dest)["x"].to_pylist() == [1, 2]
    assert [p.name for p in dest.parent.iterdir()] == ["t.parquet"]


def test_a_dead_writers_atomic_temporary_is_unlisted_and_removed(tmp_path):
    store = Storage(str(tmp_path))
    store.write_bytes("a/x.bin", b"x")
    with atomic_path(tmp_path / "a" / "y.bin") as tmp:
        left = tmp_path / "a" / os.path.basename(tmp).replace(f"-{os.getpid()}-", "-999999999-")
        left.write_bytes(b"half")  # as a writer killed mid-file leaves it
        open(tmp, "wb").close()
    assert store.list("a") == ["a/x.bin", "a/y.bin"]
    assert store.remove_stale_temporaries("a") == 1 and not left.exists()


def test_output_and_input_folders_on_s3(s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="folders")
    store = Storage("s3://folders/root", S3Options(endpoint_url=s3_server))
    store.write_bytes("idx/stale.index", b"old build")
    store.write_bytes("idx/_report.json", b"{}")
    with pytest.raises(RuntimeError, match="build failed"), store.output_folder("idx", last="_report.json") as folder:
        raise RuntimeError("build failed")
    assert store.list("idx") == ["idx/_report.json", "idx/stale.index"]  # a failed build commits nothing

    committed = []
    put_file = store.put_file
    monkeypatch.setattr(store, "put_file", lambda local, key: committed.append(key) or put_file(local, key))
    with store.output_folder("idx", last="_report.json") as folder:
        for name in ("_report.json", "a.index", "z.index", ".tmp-scratch"):
            with open(os.path.join(folder, name), "w") as fh:
                fh.write(name)
    assert committed == ["idx/a.index", "idx/z.index", "idx/_report.json"]  # the marker last
    assert store.list("idx") == ["idx/_report.json", "idx/a.index", "idx/z.index"]
    with store.input_folder("idx") as local:
        assert sorted(os.listdir(local)) == ["_report.json", "a.index", "z.index"]
        with open(os.path.join(local, "z.index")) as fh:
            assert fh.read() == "z.index"


def test_a_root_written_before_the_generic_keys_is_upgraded_without_recomputing(tmp_path):
    from laion_assets.core import paths, upgrade
    from laion_assets.core.download.plan import ShardsManifest
    from laion_assets.core.paths import Layout
    from laion_assets.core.records import POINTER

    store, layout, crawl = Storage(str(tmp_path)), Layout(chunks=1, buckets=2), "CC-MAIN-2099-01"
    marker = paths.candidates_marker(crawl, "0000", layout)
    store.write_bytes(marker, b'{"chunk": "0000"}')
    prefix = paths.image_shards(crawl, "0001", layout)
    store.write_bytes(paths.shards_manifest(prefix), ShardsManifest(prefix, 0, "s", {}, []).to_json())
    store.write_bytes(f"{paths.embeddings(crawl, layout)}/manifests/bucket=0000.json", b'{"rows": 3}')
    store.write_bytes(f"{paths.crawl_root(crawl)}/knn_index_record.json", b'{"rows": 3}')
    report = upgrade.run(store, layout)
    assert (report.pointers, report.copies, report.already) == (2, 2, 0)
    pointer = store.read_json(paths.output_key(["candidate_pairs"], {"crawl": crawl, "chunk": "0000"}, layout, ".json"))
    assert pointer == {POINTER: marker}
    assert store.read_bytes(paths.output_key(["knn_index"], {"crawl": crawl}, layout, ".json")) == b'{"rows": 3}'
    assert upgrade.run(store, layout).already == 4  # the second time, nothing to do
