"""One place that reads and writes the pipeline's files, on a local directory or under `s3://bucket/prefix`.

`Storage(root)` is a `LocalStorage` for a directory and an `S3Storage` for an `s3://` root, as `pathlib.Path(p)` is a
`PosixPath` or a `WindowsPath`: both backends have the interface of `Storage`, so callers never ask which one they
hold. What differs between a disk and S3 (where a scratch folder lives, whether a folder's files must be downloaded or
uploaded) is a method of the backend, not a branch of the caller.

Every write is atomic: a local file is written under a temporary name, fsynced and renamed (with the permissions a
plain `open` would give it; `atomic_path` does this for any writer that takes a path), an S3 object is a single PUT
(or a completed multipart upload), so a killed run never leaves a half-file that a rerun would trust.

An `S3Storage` pickles without its S3 client and rebuilds it from the same `S3Options` (endpoint, region,
credentials), so worker processes see exactly what the parent does.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: what boto3 needs beyond its own environment variables and config files.

    `max_attempts` is botocore's: retries after the first request, so a request is made at most `max_attempts + 1`
    times (botocore's standard retry mode: throttling, 5xx, connection errors and timeouts, with jittered backoff).
    """

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    profile_name: str | None = None
    use_ssl: bool = True
    verify: bool | str | None = None
    max_attempts: int = 5

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(profile_name=self.profile_name)
        kwargs = {k: v for k, v in asdict(self).items()
                  if k not in ("profile_name", "max_attempts") and v is not None}
        return session.client("s3", config=Config(retries={"max_attempts": self.max_attempts, "mode": "standard"}),
                              **kwargs)


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in blocks (parts, indices and checkpoints run to gigabytes)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary path beside `dest` for a writer that takes a path (open(), faiss, torch, pyarrow): when the block
    ends without error the file is fsynced, given the permissions a plain open() would give it, renamed to `dest`,
    and its directory fsynced; when it raises, the temporary is removed and `dest` is left as it was. `dest`'s folder
    is created if missing. The temporary's name (`.tmp-<host>-<pid>-...`) is skipped by `Storage.list` and removed
    by `remove_stale_temporaries` once its process is gone."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=dest.parent)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


class Storage(abc.ABC):
    """A storage root: a local directory or `s3://bucket/prefix`; keys are `/`-separated relative paths.

    `Storage(root, s3_options)` makes the backend the root names (`LocalStorage` or `S3Storage`). The public methods
    are defined here only, each checking its key and calling the backend's underscored method: a backend implements
    those, so that what wraps or patches `Storage.put_file` (a test killing a writer mid-commit) sees every backend's
    writes."""

    root: str

    def __new__(cls, root: str, s3_options: S3Options | None = None) -> Storage:
        # Dispatch here rather than in a factory: every caller, the Dagster resource and the tests construct
        # `Storage(root)` and annotate `Storage`, and keep doing so unchanged.
        if cls is Storage:
            cls = S3Storage if root.startswith("s3://") else LocalStorage
        return super().__new__(cls)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    @staticmethod
    def _check(key: str) -> str:
        # A key is relative: "/x" would escape the root on a local disk.
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage keys are relative paths without '..': {key!r}")
        return key

    # --- naming -------------------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        """The full location of a key: a local path or an s3:// URI."""
        return self._uri(self._check(key))

    # --- reading ------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._exists(self._check(key))

    def read_bytes(self, key: str) -> bytes:
        return self._read_bytes(self._check(key))

    def size(self, key: str) -> int:
        return self._size(self._check(key))

    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix (a folder), sorted; temporary files of unfinished writes are not listed."""
        return self._list(self._check(prefix.strip("/")))

    def download(self, key: str, dest: str) -> None:
        """Copy an object to a local file."""
        self._download(self._check(key), dest)

    def scratch_copies(self, keys: list[str]) -> list[str]:
        """Local paths for keys that stay readable until this process exits: the files themselves on a local root,
        downloads into the process's scratch folder on S3. For readers that outlive the call (a polars LazyFrame
        is scanned when it is written, after the asset that built it has returned)."""
        return self._scratch_copies([self._check(k) for k in keys])

    def local_copies(self, keys: list[str]) -> contextlib.AbstractContextManager[list[str]]:
        """Local paths for keys: the files themselves on a local root, temporary downloads on S3."""
        return self._local_copies([self._check(k) for k in keys])

    def input_folder(self, prefix: str) -> contextlib.AbstractContextManager[str]:
        """A local folder holding the files under prefix (their names relative to it), for readers that take a
        folder (faiss): the folder itself on a local root, a temporary download on S3."""
        return self._input_folder(self._check(prefix.strip("/")))

    def read_parquet(self, key: str, columns: list[str] | None = None) -> Any:
        return self._read_parquet(self._check(key), columns)

    def parquet_rows(self, key: str) -> int:
        """Rows of a Parquet object, from its footer (on S3 two ranged reads of the object's tail, not the object)."""
        return self._parquet_rows(self._check(key))

    # --- writing ------------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        self._write_bytes(self._check(key), data)

    def put_file(self, local_path: str, key: str) -> None:
        """Commit a finished local file under key (moved when both are on one disk, else copied)."""
        self._put_file(local_path, self._check(key))

    def staging_dir(self) -> contextlib.AbstractContextManager[str]:
        """A scratch directory for files that put_file commits; on the same disk as a local root."""
        return self._staging_dir()

    def output_folder(self, key: str, last: str) -> contextlib.AbstractContextManager[str]:
        """A local folder for writers that take a folder (faiss, autofaiss) whose files become the folder `key`
        when the block ends without error, `last` (the file marking the folder complete) committed last: the
        folder itself on a local root, where the writer writes `last` last; on S3 a temporary folder uploaded when
        the block ends (the old `last` deleted first and files of an older build that the new one lacks deleted,
        so that the folder reads as incomplete while it uploads). Names starting with '.' are not committed."""
        return self._output_folder(self._check(key.strip("/")), self._check(last))

    def remove_stale_temporaries(self, prefix: str = "") -> int:
        """Delete what killed writers on this host left behind: staging folders under the root and
        temporary files directly under prefix whose process is gone. Returns how many were removed."""
        return self._remove_stale_temporaries(self._check(prefix.strip("/")))

    def delete(self, key: str) -> None:
        self._delete(self._check(key))

    # --- typed helpers ----------------------------------------------------------------------------------
    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, doc: Any) -> None:
        self.write_bytes(key, json.dumps(doc, indent=1, sort_keys=True, default=str).encode())

    def write_parquet(self, key: str, table: Any, **options: Any) -> None:
        """Store a pyarrow Table as zstd Parquet; `options` go to pyarrow.parquet.write_table (and may override the
        compression)."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, **{"compression": "zstd", **options})
        self.write_bytes(key, buf.getvalue())

    # --- what a backend implements, for checked keys ------------------------------------------------------
    @abc.abstractmethod
    def _uri(self, key: str) -> str: ...

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _read_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def _size(self, key: str) -> int: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def _download(self, key: str, dest: str) -> None: ...

    @abc.abstractmethod
    def _scratch_copies(self, keys: list[str]) -> list[str]: ...

    @abc.abstractmethod
    def _local_copies(self, keys: list[str]) -> contextlib.AbstractContextManager[list[str]]: ...

    @abc.abstractmethod
    def _input_folder(self, prefix: str) -> contextlib.AbstractContextManager[str]: ...

    @abc.abstractmethod
    def _read_parquet(self, key: str, columns: list[str] | None) -> Any: ...

    @abc.abstractmethod
    def _parquet_rows(self, key: str) -> int: ...

    @abc.abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _put_file(self, local_path: str, key: str) -> None: ...

    @abc.abstractmethod
    def _staging_dir(self) -> contextlib.AbstractContextManager[str]: ...

    @abc.abstractmethod
    def _output_folder(self, key: str, last: str) -> contextlib.AbstractContextManager[str]: ...

    @abc.abstractmethod
    def _remove_stale_temporaries(self, prefix: str) -> int: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...


class LocalStorage(Storage):
    """A storage root on a local disk: keys are files under the root directory."""

    def __init__(self, root: str, s3_options: S3Options | None = None) -> None:
        # s3_options is taken so that `Storage(root, options)` works for either kind of root (the Dagster resource
        # always passes them); a local root has no use for it.
        if root.startswith("s3://"):
            raise ValueError(f"{root!r} is an S3 root: use Storage() or S3Storage()")
        self.root = str(Path(root).absolute())

    def __reduce__(self) -> tuple[Any, ...]:
        return LocalStorage, (self.root,)

    def _path(self, key: str) -> Path:
        return Path(self.root, key)

    def _uri(self, key: str) -> str:
        return str(self._path(key))

    def _exists(self, key: str) -> bool:
        return self._path(key).exists()

    def _read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        # A temporary's name, or a staging folder's (what its files are staged for is not written yet).
        keys = [
            str(p.relative_to(self.root)).replace(os.sep, "/")
            for p in base.rglob("*")
            if p.is_file() and not any(part.startswith(".tmp-") for part in p.relative_to(base).parts)
        ]
        return sorted(keys)

    def _download(self, key: str, dest: str) -> None:
        shutil.copyfile(self._path(key), dest)

    def _scratch_copies(self, keys: list[str]) -> list[str]:
        return [str(self._path(k)) for k in keys]

    @contextlib.contextmanager
    def _local_copies(self, keys: list[str]) -> Iterator[list[str]]:
        yield [str(self._path(k)) for k in keys]

    @contextlib.contextmanager
    def _input_folder(self, prefix: str) -> Iterator[str]:
        yield str(self._path(prefix))

    def _read_parquet(self, key: str, columns: list[str] | None) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self._path(key), columns=columns)

    def _parquet_rows(self, key: str) -> int:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._path(key)).metadata.num_rows

    def _write_bytes(self, key: str, data: bytes) -> None:
        with atomic_path(self._path(key)) as tmp, open(tmp, "wb") as fh:
            fh.write(data)

    def _put_file(self, local_path: str, key: str) -> None:
        with atomic_path(self._path(key)) as tmp:
            if os.stat(local_path).st_dev == os.stat(tmp).st_dev:
                os.replace(local_path, tmp)
            else:
                shutil.copyfile(local_path, tmp)

    @contextlib.contextmanager
    def _staging_dir(self) -> Iterator[str]:
        # Under the root, so that put_file moves a staged file rather than copying it.
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=_tmp_prefix("stage-"), dir=self.root) as tmp:
            yield tmp

    @contextlib.contextmanager
    def _output_folder(self, key: str, last: str) -> Iterator[str]:
        folder = self._path(key)
        folder.mkdir(parents=True, exist_ok=True)
        yield str(folder)

    def _remove_stale_temporaries(self, prefix: str) -> int:
        removed = 0
        for folder in {Path(self.root), self._path(prefix) if prefix else Path(self.root)}:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if _left_by_dead_process(entry.name):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            entry.unlink()
                    removed += 1
        return removed

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


class S3Storage(Storage):
    """A storage root under `s3://bucket/prefix`: keys are objects under the prefix."""

    def __init__(self, root: str, s3_options: S3Options | None = None) -> None:
        if not root.startswith("s3://"):
            raise ValueError(f"{root!r} is not an s3:// root")
        bucket, _, prefix = root[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"storage root {root!r} names no bucket")
        self.root = root.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.s3_options = s3_options or S3Options()
        self._s3: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Clients do not pickle; the options rebuild one in the process that unpickles.
        return S3Storage, (self.root, self.s3_options)

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = self.s3_options.client()
        return self._s3

    def _s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._s3_key(key)}"

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._s3_key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _read_bytes(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=self._s3_key(key))["Body"].read()

    def _size(self, key: str) -> int:
        return int(self.s3.head_object(Bucket=self.bucket, Key=self._s3_key(key))["ContentLength"])

    def _list(self, prefix: str) -> list[str]:
        full = self._s3_key(prefix) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def _download(self, key: str, dest: str) -> None:
        self.s3.download_file(self.bucket, self._s3_key(key), dest)

    def _scratch_copies(self, keys: list[str]) -> list[str]:
        folder = _process_scratch()
        out = []
        for key in keys:
            fd, dest = tempfile.mkstemp(prefix="in-", suffix="-" + os.path.basename(key), dir=folder)
            os.close(fd)
            self._download(key, dest)
            out.append(dest)
        return out

    @contextlib.contextmanager
    def _local_copies(self, keys: list[str]) -> Iterator[list[str]]:
        with tempfile.TemporaryDirectory(prefix="laion-assets-") as tmp:
            paths = []
            for i, key in enumerate(keys):
                dest = os.path.join(tmp, f"{i:06d}-{os.path.basename(key)}")
                self._download(key, dest)
                paths.append(dest)
            yield paths

    @contextlib.contextmanager
    def _input_folder(self, prefix: str) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="laion-assets-") as tmp:
            for key in self._list(prefix):
                dest = os.path.join(tmp, key[len(prefix) + 1 :] if prefix else key)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                self._download(key, dest)
            yield tmp

    def _read_parquet(self, key: str, columns: list[str] | None) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self._read_bytes(key)), columns=columns)

    def _parquet_rows(self, key: str) -> int:
        import pyarrow.parquet as pq

        return pq.read_metadata(io.BytesIO(self._parquet_footer(key))).num_rows

    def _parquet_footer(self, key: str) -> bytes:
        """A Parquet object's footer as a file pyarrow reads metadata from: magic, footer, its length, magic."""
        def tail(n: int) -> bytes:
            return self.s3.get_object(Bucket=self.bucket, Key=self._s3_key(key), Range=f"bytes=-{n}")["Body"].read()

        end = tail(8)
        if len(end) != 8 or end[4:] != b"PAR1":
            raise ValueError(f"{self._uri(key)} is not a Parquet file (no PAR1 magic at its end)")
        return b"PAR1" + tail(int.from_bytes(end[:4], "little") + 8)

    def _write_bytes(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)

    def _put_file(self, local_path: str, key: str) -> None:
        self.s3.upload_file(local_path, self.bucket, self._s3_key(key))

    @contextlib.contextmanager
    def _staging_dir(self) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="laion-assets-") as tmp:
            yield tmp

    @contextlib.contextmanager
    def _output_folder(self, key: str, last: str) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="laion-assets-") as tmp:
            yield tmp

            def under(name: str) -> str:  # the folder may be the root itself (key "")
                return f"{key}/{name}" if key else name

            # Through the public methods: what patches Storage's writes sees these too.
            self.delete(under(last))
            names = _committed_names(tmp)
            for old in self.list(key):
                if (old[len(key) + 1 :] if key else old) not in names:
                    self.delete(old)
            for name in sorted(names, key=lambda n: n == last):
                self.put_file(os.path.join(tmp, name), under(name))

    def _remove_stale_temporaries(self, prefix: str) -> int:
        return 0  # S3 uploads are atomic; staging lives in the local temp dir

    def _delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._s3_key(key))


@dataclass(frozen=True)
class LocalParquet:
    """A finished Parquet file on local disk that an asset returns as its table: the IO manager stores the file as it
    is (a stage that streams a table larger than memory writes it once, in its own row groups)."""

    path: str


def scratch_folder(prefix: str) -> str:
    """A new local folder that lives until this process exits: for files read after the function that wrote them
    has returned (a LazyFrame an asset returns, scanned by the IO manager)."""
    return tempfile.mkdtemp(prefix=prefix, dir=_process_scratch())


@functools.lru_cache(maxsize=1)
def _process_scratch() -> str:
    # One folder per process, removed when it exits: each Dagster step runs in a process of its own.
    folder = tempfile.mkdtemp(prefix=f"laion-assets-scratch-{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _committed_names(folder: str) -> list[str]:
    # Relative, `/`-separated names of a folder's files, hidden ones (and those in hidden folders) left out.
    names = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(top, folder)
        names += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in files if not n.startswith(".")]
    return sorted(names)


def _current_umask() -> int:
    # Read, not set: os.umask() both reads and sets, which would race with other threads.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # The rename itself is durable only once its directory is.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_prefix(kind: str = "") -> str:
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live one's.
    return f".tmp-{kind}{socket.gethostname()}-{os.getpid()}-"


def _left_by_dead_process(name: str) -> bool:
    host = socket.gethostname()
    for kind in ("stage-", ""):
        head = f".tmp-{kind}{host}-"
        if name.startswith(head):
            pid = name[len(head):].split("-", 1)[0]
            if not pid.isdigit():
                return False
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
    return False
