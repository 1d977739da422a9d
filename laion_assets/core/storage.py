"""One place that reads and writes the pipeline's files, on a local directory or under `s3://bucket/prefix`.

Every write is atomic: a local file is written under a temporary name and renamed, an S3 object is a
single PUT (or a completed multipart upload), so a killed run never leaves a half-file that a rerun
would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
    def _s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> Path:
        return Path(self.root, key)

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
        full = self._s3_key(prefix) + "/"
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
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
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
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
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
        with tempfile.TemporaryDirectory(prefix=".tmp-stage-", dir=self.root) as tmp:
            yield tmp

    def delete(self, key: str) -> None:
        if self.is_s3:
            self.s3.delete_object(Bucket=self.bucket, Key=self._s3_key(key))
        else:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
