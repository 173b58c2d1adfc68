"""``S3Store``: the object store on S3 or any S3-compatible service, through boto3.

Opened by ``cloud_sync.store.open_store("s3://bucket/prefix")``. Region and credentials come
from boto3's usual chain (environment, profile, instance role); the endpoint from the
``endpoint_url`` argument or ``AWS_ENDPOINT_URL`` (MinIO, moto, R2, ...). Throttling and 5xx
answers are retried with exponential backoff by botocore's retry modes; files past
``MULTIPART_THRESHOLD`` go up and down in parallel parts through boto3's transfer manager.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from cloud_sync.object_store import ObjectStore, check_key
from modelpack.errors import ConflictError, NotFoundError, SizeLimitError, StoreError

MULTIPART_THRESHOLD = 16 << 20
MULTIPART_CHUNK = 16 << 20
MAX_ATTEMPTS = 8
_MISSING = {"NoSuchKey", "404", "NotFound"}
# 412: the precondition did not hold; 409: a concurrent conditional write to the key won.
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        config = Config(
            # "standard" retries throttling, 5xx and connection errors with jittered
            # exponential backoff; ingestion threads share one client, hence the pool size.
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=5,
            read_timeout=30,
        )
        try:
            self.client: Any = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
        except Exception as exc:  # botocore raises many unrelated types for bad settings
            raise StoreError(f"cannot open {self.url}: {exc}") from exc
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=4,
        )

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: Exception, key: str, doing: str) -> StoreError:
        code = ""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            return NotFoundError(f"{key} is not in {self.url}")
        if code in _CONFLICT:
            return ConflictError(f"{key} in {self.url} exists or changed ({code})")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket} does not exist ({self.url})")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"access denied to {self.url} while {doing} {key}: {code}")
        return StoreError(f"S3 failed while {doing} {key} in {self.url}: {exc}")

    def _errors(self) -> tuple[type[Exception], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError, Boto3Error)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)
        except self._errors() as exc:
            raise self._translate(exc, key, "writing") from exc

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        return self.read(key, max_bytes)[0]

    def put_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._full(key), Config=self.transfer)
        except self._errors() as exc:
            raise self._translate(exc, key, "uploading") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {path} to upload it: {exc}") from exc

    def create(self, key: str, data: bytes) -> str:
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self._full(key), Body=data, IfNoneMatch="*"
            )
        except self._errors() as exc:
            raise self._translate(exc, key, "creating") from exc
        return str(answer.get("ETag", ""))

    def read(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str]:
        try:
            if max_bytes is None:
                answer = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
                return bytes(answer["Body"].read()), str(answer.get("ETag", ""))
            return self._read_capped(key, max(0, max_bytes))
        except self._errors() as exc:
            raise self._translate(exc, key, "reading") from exc

    def _read_capped(self, key: str, max_bytes: int) -> tuple[bytes, str]:
        """A ranged GET of at most ``max_bytes`` + 1 bytes (its ETag is the whole object's);
        an empty object has no such range (InvalidRange), so it is read plainly, at most that
        many bytes from the stream."""
        from botocore.exceptions import ClientError

        request = {"Bucket": self.bucket, "Key": self._full(key)}
        try:
            answer = self.client.get_object(**request, Range=f"bytes=0-{max_bytes}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            answer = self.client.get_object(**request)
        body = answer["Body"]
        try:
            data = bytes(body.read(max_bytes + 1))
        finally:
            body.close()
        if len(data) > max_bytes:
            raise SizeLimitError(f"{key} in {self.url} is over {max_bytes} bytes")
        return data, str(answer.get("ETag", ""))

    def replace(self, key: str, data: bytes, etag: str) -> str:
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self._full(key), Body=data, IfMatch=etag
            )
        except self._errors() as exc:
            error = self._translate(exc, key, "replacing")
            if isinstance(error, NotFoundError):  # If-Match on a key that is gone
                error = ConflictError(f"{key} is gone from {self.url}")
            raise error from exc
        return str(answer.get("ETag", ""))

    def _download_capped(self, key: str, tmp_name: str, max_bytes: int) -> None:
        # A ranged GET: the server sends at most max_bytes + 1 bytes, whatever the object's
        # size, so a swapped or inflated object costs no more than the index promised.
        answer = self.client.get_object(
            Bucket=self.bucket, Key=self._full(key), Range=f"bytes=0-{max_bytes}"
        )
        total = 0
        with open(tmp_name, "wb") as fh:
            for chunk in answer["Body"].iter_chunks(1 << 20):
                total += len(chunk)
                if total > max_bytes:
                    raise SizeLimitError(
                        f"{key} in {self.url} is over its expected {max_bytes} bytes"
                    )
                fh.write(chunk)

    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        os.close(fd)
        try:
            if max_bytes is not None:
                # A cap of 0 or less is still a cap: it must never mean "download it all".
                if max_bytes <= 0:
                    raise SizeLimitError(f"{key} in {self.url}: no bytes are expected")
                self._download_capped(key, tmp_name, max_bytes)
            else:
                self.client.download_file(
                    self.bucket, self._full(key), tmp_name, Config=self.transfer
                )
            os.replace(tmp_name, path)
        except self._errors() as exc:
            raise self._translate(exc, key, "downloading") from exc
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        return path

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except self._errors() as exc:
            error = self._translate(exc, key, "checking")
            if isinstance(error, NotFoundError):
                return False
            raise error from exc
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except self._errors() as exc:
            raise self._translate(exc, prefix or "/", "listing") from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except self._errors() as exc:
            error = self._translate(exc, key, "deleting")
            if not isinstance(error, NotFoundError):
                raise error from exc

    def presign(self, key: str, expires_s: int = 3600) -> str:
        try:
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self._full(key)},
                    ExpiresIn=int(expires_s),
                )
            )
        except self._errors() as exc:
            raise self._translate(exc, key, "presigning") from exc
