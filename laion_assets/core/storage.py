"""One place that reads and writes the pipeline's files, on a local directory or under `s3://bucket/prefix`.

Every write is atomic: a local file is written under a temporary name and renamed, an S3 object is a
single PUT (or a completed multipart upload), so a killed run never leaves a half-file that a rerun
would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Storage:
    """A storage root: a local directory or `s3://bucket/prefix`; keys are `/`-separated relative paths."""

    def __init__(self, root: str, s3_client: Any = None) -> None:
        self.root = root.rstrip("/") if root.startswith("s3://") else str(Path(root).absolute())
        self.is_s3 = root.startswith("s3://")
        if self.is_s3:
            bucket, _, prefix = root[len("s3://") :].partition("/")
            if not bucket:
                raise ValueError(f"storage root {root!r} names no bucket")
            self.bucket = bucket
            self.prefix = prefix.strip("/")
            if s3_client is None:
                import boto3

                s3_client = boto3.client("s3")
            self.s3 = s3_client

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # --- naming -------------------------------------------------------------------------------------
    @staticmethod
    def _check(key: str) -> str:
        # A key is relative: "/x" would escape the root on a local disk.
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage keys are relative paths without '..': {key!r}")
        return key

    def _s3_key(self, key: str) -> str:
        key = self._check(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> Path:
        return Path(self.root, self._check(key))

    def uri(self, key: str) -> str:
        """The full location of a key: a local path or an s3:// URI."""
        return f"s3://{self.bucket}/{self._s3_key(key)}" if self.is_s3 else str(self._path(key))

    # --- reading ------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if not self.is_s3:
            return self._path(key).exists()
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._s3_key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, key: str) -> bytes:
        if not self.is_s3:
            return self._path(key).read_bytes()
        return self.s3.get_object(Bucket=self.bucket, Key=self._s3_key(key))["Body"].read()

    def size(self, key: str) -> int:
        if not self.is_s3:
            return self._path(key).stat().st_size
        return int(self.s3.head_object(Bucket=self.bucket, Key=self._s3_key(key))["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix (a folder), sorted; temporary files of unfinished writes are not listed."""
        prefix = prefix.strip("/")
        if not self.is_s3:
            base = self._path(prefix)
            if not base.is_dir():
                return []
            keys = [
                str(p.relative_to(self.root)).replace(os.sep, "/")
                for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")
            ]
            return sorted(keys)
        full = self._s3_key(prefix) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    @contextlib.contextmanager
    def local_copies(self, keys: list[str]) -> Iterator[list[str]]:
        """Local paths for keys: the files themselves on a local root, temporary downloads on S3."""
        if not self.is_s3:
            yield [str(self._path(k)) for k in keys]
            return
        with tempfile.TemporaryDirectory(prefix="laion-assets-") as tmp:
            paths = []
            for i, key in enumerate(keys):
                dest = os.path.join(tmp, f"{i:06d}-{os.path.basename(key)}")
                self.s3.download_file(self.bucket, self._s3_key(key), dest)
                paths.append(dest)
            yield paths

    # --- writing ------------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        if self.is_s3:
            self.s3.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)
            return
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_file(self, local_path: str, key: str) -> None:
        """Commit a finished local file under key (moved when both are on one disk, else copied)."""
        if self.is_s3:
            self.s3.upload_file(local_path, self.bucket, self._s3_key(key))
            return
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.stat(local_path).st_dev == os.stat(dest.parent).st_dev:
            os.replace(local_path, dest)
            return
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[str]:
        """A scratch directory for files that put_file commits; on the same disk as a local root."""
        if self.is_s3:
            with tempfile.TemporaryDirectory(prefix="laion-assets-") as tmp:
                yield tmp
            return
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=_tmp_prefix("stage-"), dir=self.root) as tmp:
            yield tmp

    def remove_stale_temporaries(self, prefix: str = "") -> int:
        """Delete what killed writers on this host left behind: staging folders under the root and
        temporary files directly under prefix whose process is gone. Returns how many were removed."""
        if self.is_s3:
            return 0  # S3 uploads are atomic; staging lives in the local temp dir
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

    def delete(self, key: str) -> None:
        if self.is_s3:
            self.s3.delete_object(Bucket=self.bucket, Key=self._s3_key(key))
        else:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()


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
