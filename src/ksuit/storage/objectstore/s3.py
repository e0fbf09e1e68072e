"""S3 through s3fs: its session, credentials and endpoint, and its aiobotocore client for the
requests s3fs has no API for (conditional writes, multipart parts streamed from a save).

Every request runs on s3fs's event loop, retried on transient errors by `RetryPolicy` (botocore's
own retries are off unless the storage options configure them, so the budget is ksuit's);
permanent errors become `StoreAccessError` (credentials, 403, no such bucket) or an `OSError`
naming the request. Multipart uploads stream parts of `part_size` bytes with at most
`concurrency` parts in memory; downloads fetch `part_size` ranges, `concurrency` at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import errno
import functools
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any, TypeVar

import xxhash

from ksuit.storage.errors import StoreAccessError
from ksuit.storage.objectstore.retry import Attempts, RetryPolicy, describe, with_retries
from ksuit.storage.objectstore.stores import (
    Fetched,
    Listed,
    PreconditionFailed,
    Store,
    Stored,
    TooLarge,
    Upload,
)
from ksuit.storage.objectstore.streams import PartBuffers, PartReader, UploadStream

T = TypeVar("T")
MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's smallest part (but the last)
MAX_PARTS = 10_000
DOWNLOAD_RANGE = 64 * MIB  # larger objects download in ranges of this size, in parallel
DOWNLOAD_PIECE = 1 * MIB
TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ConditionalRequestConflict",
    "OperationAborted",
}
DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
}


def _error_code(e: BaseException) -> tuple[str, int]:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(e: BaseException) -> bool:
    """Whether retrying can help: server errors, throttling, timeouts, dropped connections."""
    import botocore.exceptions as bex

    if isinstance(e, bex.ClientError):
        code, status = _error_code(e)
        return status in (429, 500, 502, 503, 504) or code in TRANSIENT_CODES
    if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.ParamValidationError)):
        return False
    transient: tuple[type[BaseException], ...] = (
        bex.ConnectionError,
        bex.HTTPClientError,
        bex.IncompleteReadError,
        asyncio.TimeoutError,
        ConnectionError,
    )
    extra = getattr(bex, "ResponseStreamingError", None)
    if extra is not None:
        transient += (extra,)
    try:
        import aiohttp

        transient += (aiohttp.ClientError,)
    except ImportError:  # pragma: no cover - aiobotocore depends on aiohttp
        pass
    if isinstance(e, transient):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


def _server_time(headers: Any) -> float:
    date = headers.get("date") if isinstance(headers, dict) else None
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()


def _time_of(response: Any) -> float:
    return _server_time(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))


class S3Store(Store):
    """A bucket store reached through one s3fs file system (one session, one event loop)."""

    protocol = "s3"
    conditional_writes = True

    def __init__(
        self,
        fs: Any,
        policy: RetryPolicy | None = None,
        part_size: int = 16 * MIB,
        concurrency: int = 4,
    ):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's smallest part)")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.fs = fs
        self.policy = policy or RetryPolicy()
        self.part_size = part_size
        self.concurrency = concurrency

    def __repr__(self) -> str:
        return f"S3Store(part_size={self.part_size}, concurrency={self.concurrency})"

    # ---- plumbing -----------------------------------------------------------------------------
    def _sync(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        from fsspec.asyn import sync

        result: T = sync(self.fs.loop, fn, *args, **kwargs)
        return result

    def _submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)  # type: ignore[arg-type]

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key

    async def _call(
        self,
        op: str,
        path: str,
        *,
        attempts: Attempts | None = None,
        read_body: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """One S3 request, retried while transient; its body read when `read_body`."""
        client = await self.fs.set_session()
        method = getattr(client, op)
        helper = getattr(self.fs, "_get_s3_method_kwargs", None)  # the user's s3_additional_kwargs
        if callable(helper):
            kwargs = helper(method, **kwargs)

        async def once() -> dict[str, Any]:
            seek = getattr(kwargs.get("Body"), "seek", None)
            if callable(seek):  # a retry sends the whole part again
                seek(0)
            response: dict[str, Any] = await method(**kwargs)
            if read_body:
                async with response["Body"] as body:
                    response["Data"] = await body.read()
            return response

        try:
            return await with_retries(once, self.policy, is_transient, f"{op} {self.url(path)}", attempts)
        except Exception as e:
            raise self._permanent(e, op, path) from e

    def _permanent(self, e: Exception, op: str, path: str) -> Exception:
        """What a non-retryable error means to the caller."""
        import botocore.exceptions as bex

        bucket, _ = self._split(path)
        url = self.url(path)
        if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return StoreAccessError(
                f"no credentials to reach {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE, a profile in ~/.aws), or pass storage_options (--storage-option key=... "
                f"--storage-option secret=...) ({describe(e)})"
            )
        code, status = _error_code(e)
        if code == "NoSuchBucket":
            return StoreAccessError(
                f"the bucket '{bucket}' of {url} does not exist ({code}); create it first or fix the "
                "URL: ksuit never creates buckets"
            )
        if code in DENIED_CODES or status == 403:
            return StoreAccessError(
                f"access to {url} was refused ({status} {code or 'Forbidden'}): the credentials may not "
                f"{'write' if op.startswith(('put', 'upload', 'create', 'complete', 'delete')) else 'read'} "
                f"in bucket '{bucket}'; check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, storage "
                "options) and the bucket's policy"
            )
        return e

    # ---- small objects ------------------------------------------------------------------------
    def get(self, path: str, max_bytes: int, if_none_match: str | None = None) -> Fetched:
        return self._sync(self._get, path, max_bytes, if_none_match)

    async def _get(self, path: str, max_bytes: int, if_none_match: str | None) -> Fetched:
        import botocore.exceptions as bex

        bucket, key = self._split(path)
        condition: dict[str, Any] = {"IfNoneMatch": if_none_match} if if_none_match else {}
        try:
            response = await self._call(
                "get_object",
                path,
                read_body=True,
                Bucket=bucket,
                Key=key,
                Range=f"bytes=0-{max_bytes}",
                **condition,
            )
        except bex.ClientError as e:
            code, status = _error_code(e)
            when = _server_time(e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
            if status == 304 or code in ("304", "NotModified"):
                return Fetched(None, if_none_match, when, not_modified=True)
            if code in ("NoSuchKey", "404", "NotFound"):
                return Fetched(None, None, when)
            if code == "InvalidRange":  # an empty object has no byte 0
                response = await self._call("get_object", path, read_body=True, Bucket=bucket, Key=key)
            else:
                raise
        data: bytes = response["Data"]
        if len(data) > max_bytes:
            raise TooLarge(path, len(data))
        return Fetched(data, str(response.get("ETag")), _time_of(response))

    def get_many(self, paths: Sequence[str], max_bytes: int) -> dict[str, bytes | None]:
        async def all_of() -> list[Fetched]:
            limit = asyncio.Semaphore(max(8, self.concurrency))

            async def one(p: str) -> Fetched:
                async with limit:
                    return await self._get(p, max_bytes, None)

            return list(await asyncio.gather(*(one(p) for p in paths)))

        return {p: f.data for p, f in zip(paths, self._sync(all_of), strict=True)}

    def put(
        self, path: str, data: bytes, *, create_only: bool = False, if_match: str | None = None
    ) -> Stored:
        return self._sync(self._put, path, data, create_only, if_match)

    async def _put(self, path: str, data: bytes, create_only: bool, if_match: str | None) -> Stored:
        import botocore.exceptions as bex

        bucket, key = self._split(path)
        condition: dict[str, Any] = {}
        if create_only:
            condition["IfNoneMatch"] = "*"
        if if_match is not None:
            condition["IfMatch"] = if_match
        attempts = Attempts()
        try:
            response = await self._call(
                "put_object", path, attempts=attempts, Bucket=bucket, Key=key, Body=data, **condition
            )
        except bex.ClientError as e:
            code, status = _error_code(e)
            if status == 412 or code == "PreconditionFailed":
                raise PreconditionFailed(path, retried=attempts.retried) from None
            if code in ("NoSuchKey", "404") and if_match is not None:  # the object to swap is gone
                raise PreconditionFailed(path, retried=attempts.retried) from None
            raise
        return Stored(str(response["ETag"]), _time_of(response))

    def size(self, path: str) -> int | None:
        return self._sync(self._size, path)

    async def _size(self, path: str) -> int | None:
        import botocore.exceptions as bex

        bucket, key = self._split(path)
        try:
            response = await self._call("head_object", path, Bucket=bucket, Key=key)
        except bex.ClientError as e:
            if _error_code(e)[0] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(response["ContentLength"])

    # ---- large objects ------------------------------------------------------------------------
    def read_range(self, path: str, start: int, end: int) -> bytes:
        return self._sync(self._read_range, path, start, end)

    async def _read_range(self, path: str, start: int, end: int) -> bytes:
        import botocore.exceptions as bex

        if end <= start:
            return b""
        bucket, key = self._split(path)
        try:
            response = await self._call(
                "get_object", path, read_body=True, Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
        except bex.ClientError as e:
            if _error_code(e)[0] == "InvalidRange":
                return b""
            if _error_code(e)[0] in ("NoSuchKey", "404"):
                raise FileNotFoundError(
                    errno.ENOENT, f"{self.url(path)} does not exist", self.url(path)
                ) from None
            raise
        data: bytes = response["Data"]
        return data

    def download(self, path: str, out: IO[bytes], size: int) -> str | None:
        return self._sync(self._download, path, out, size)

    async def _download(self, path: str, out: IO[bytes], size: int) -> str | None:
        """One streamed GET for an object of up to `DOWNLOAD_RANGE` bytes, else ranges of that
        size, `concurrency` at a time; either way the bytes go to the file in pieces of
        `DOWNLOAD_PIECE` (memory stays at `concurrency` pieces)."""
        fd, base = out.fileno(), out.tell()
        limit = asyncio.Semaphore(self.concurrency)

        async def one(start: int, end: int) -> str:
            async with limit:
                return await with_retries(
                    functools.partial(self._stream_range, path, fd, base, start, end, size),
                    self.policy,
                    is_transient,
                    f"get_object {self.url(path)} bytes {start}-{end - 1}",
                )

        starts = range(0, size, DOWNLOAD_RANGE)
        digests = await asyncio.gather(*(one(s, min(size, s + DOWNLOAD_RANGE)) for s in starts))
        out.seek(base + size)
        return digests[0] if len(digests) == 1 else None  # one range: hashed in file order

    async def _stream_range(self, path: str, fd: int, base: int, start: int, end: int, size: int) -> str:
        """Writes bytes `[start, end)` of the object at their place in `fd`; returns their xxh3-64."""
        bucket, key = self._split(path)
        ranged = {"Range": f"bytes={start}-{end - 1}"} if (start, end) != (0, size) else {}
        client = await self.fs.set_session()
        try:
            response = await client.get_object(Bucket=bucket, Key=key, **ranged)
        except Exception as e:
            if is_transient(e):
                raise
            raise self._permanent(e, "get_object", path) from e
        offset = start
        digest = xxhash.xxh3_64()
        async with response["Body"] as body:
            while chunk := await body.read(DOWNLOAD_PIECE):
                if offset + len(chunk) > end:
                    raise OSError(errno.EIO, f"{self.url(path)} is longer than its listed {size} bytes")
                os.pwrite(fd, chunk, base + offset)
                digest.update(chunk)
                offset += len(chunk)
        if offset != end:
            raise OSError(errno.EIO, f"{self.url(path)} is shorter than its listed {size} bytes")
        return digest.hexdigest()

    def open_write(self, path: str, expected_nbytes: int) -> UploadStream:
        return _MultipartUpload(self, path, self.part_size_for(expected_nbytes), expected_nbytes)

    def part_size_for(self, expected_nbytes: int) -> int:
        """`part_size`, or larger when the file would need more than S3's 10,000 parts."""
        needed = math.ceil(max(expected_nbytes, 0) / (MAX_PARTS - 1000) / MIB) * MIB
        return max(self.part_size, needed)

    async def _create_upload(self, path: str) -> str:
        bucket, key = self._split(path)
        response = await self._call("create_multipart_upload", path, Bucket=bucket, Key=key)
        return str(response["UploadId"])

    async def _upload_part(self, path: str, upload_id: str, number: int, data: bytearray) -> str:
        bucket, key = self._split(path)
        body = PartReader(data)  # read in chunks by the HTTP client: the part is never copied whole
        try:
            response = await self._call(
                "upload_part", path, Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
        finally:
            body.release()
        return str(response["ETag"])

    async def _complete_upload(self, path: str, upload_id: str, etags: list[str], nbytes: int) -> None:
        import botocore.exceptions as bex

        bucket, key = self._split(path)
        parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
        attempts = Attempts()
        try:
            await self._call(
                "complete_multipart_upload",
                path,
                attempts=attempts,
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except bex.ClientError as e:
            # completed by an earlier attempt whose answer was lost (retried by us or the HTTP client)
            if not (_error_code(e)[0] == "NoSuchUpload" and await self._size(path) == nbytes):
                raise

    # ---- listing and deleting -----------------------------------------------------------------
    def list_folder(self, prefix: str, recursive: bool = False) -> tuple[list[Listed], list[str]]:
        return self._sync(self._list_folder, prefix, recursive)

    async def _list_folder(self, prefix: str, recursive: bool) -> tuple[list[Listed], list[str]]:
        bucket, key = self._split(prefix)
        key = key.rstrip("/") + "/" if key.strip("/") else ""
        files: list[Listed] = []
        folders: list[str] = []
        token: dict[str, Any] = {}
        delimiter: dict[str, Any] = {} if recursive else {"Delimiter": "/"}
        while True:
            response = await self._call(
                "list_objects_v2", prefix, Bucket=bucket, Prefix=key, **delimiter, **token
            )
            for obj in response.get("Contents", []):
                if obj["Key"] != key:
                    files.append(Listed(f"{bucket}/{obj['Key']}", int(obj["Size"])))
            for common in response.get("CommonPrefixes", []):
                folders.append(common["Prefix"][len(key) :].rstrip("/"))
            if not response.get("IsTruncated"):
                break
            token = {"ContinuationToken": response["NextContinuationToken"]}
        return files, sorted(folders)

    def delete(self, paths: Sequence[str]) -> None:
        if paths:
            self._sync(self._delete, list(paths))

    async def _delete(self, paths: list[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for path in paths:
            bucket, key = self._split(path)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i : i + 1000]]
                response = await self._call(
                    "delete_objects",
                    f"{bucket}/{keys[i]}",
                    Bucket=bucket,
                    Delete={"Objects": batch, "Quiet": True},
                )
                errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
                if errors:
                    first = errors[0]
                    raise OSError(
                        errno.EIO,
                        f"could not delete {len(errors)} objects in bucket '{bucket}', e.g. "
                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}",
                    )

    def list_uploads(self, prefix: str) -> list[Upload]:
        return self._sync(self._list_uploads, prefix)

    async def _list_uploads(self, prefix: str) -> list[Upload]:
        bucket, key = self._split(prefix)
        key = key.rstrip("/") + "/" if key.strip("/") else ""
        uploads: list[Upload] = []
        markers: dict[str, Any] = {}
        while True:
            response = await self._call(
                "list_multipart_uploads", prefix, Bucket=bucket, Prefix=key, **markers
            )
            for u in response.get("Uploads", []):
                uploads.append(Upload(f"{bucket}/{u['Key']}", str(u["UploadId"])))
            if not response.get("IsTruncated"):
                return uploads
            markers = {
                "KeyMarker": response["NextKeyMarker"],
                "UploadIdMarker": response["NextUploadIdMarker"],
            }

    def abort_upload(self, upload: Upload) -> None:
        self._sync(self._abort_upload, upload)

    async def _abort_upload(self, upload: Upload) -> None:
        import botocore.exceptions as bex

        bucket, key = self._split(upload.path)
        try:
            await self._call(
                "abort_multipart_upload", upload.path, Bucket=bucket, Key=key, UploadId=upload.upload_id
            )
        except bex.ClientError as e:
            if _error_code(e)[0] not in ("NoSuchUpload", "404"):
                raise


def _release(buffers: PartBuffers, buffer: bytearray, _done: object) -> None:
    buffers.release(buffer)


class _MultipartUpload(UploadStream):
    """Streams an object in parts: full parts upload in the background, at most `concurrency`
    parts (filled or uploading) exist at once; a file smaller than one part is one PUT."""

    def __init__(self, store: S3Store, path: str, part_size: int, expected_nbytes: int):
        super().__init__(store.url(path))
        self.store = store
        self.path = path
        self.part_size = part_size
        # a growing buffer briefly holds two copies of itself: parts of a large file are made whole
        self.buffers = PartBuffers(store.concurrency, part_size, preallocate=expected_nbytes >= part_size)
        self.buffer: bytearray | None = None
        self.fill = 0
        self.upload_id: str | None = None
        self.parts: list[concurrent.futures.Future[str]] = []

    def _send(self, view: memoryview) -> None:
        offset, total = 0, view.nbytes
        while offset < total:
            if self.buffer is None:
                self.buffer, self.fill = self.buffers.acquire(), 0
            k = min(self.part_size - self.fill, total - offset)
            self.buffer[self.fill : self.fill + k] = view[offset : offset + k]
            self.fill += k
            offset += k
            if self.fill == self.part_size:
                self._submit_part()

    def _submit_part(self) -> None:
        buffer, self.buffer = self.buffer, None
        assert buffer is not None
        del buffer[self.fill :]  # a recycled buffer longer than the last part
        for done in self.parts:
            if done.done() and done.exception() is not None:
                self.buffers.release(buffer)
                raise done.exception()  # type: ignore[misc]
        if self.upload_id is None:
            try:
                self.upload_id = self.store._sync(self.store._create_upload, self.path)
            except BaseException:
                self.buffers.release(buffer)
                raise
        future = self.store._submit(
            self.store._upload_part(self.path, self.upload_id, len(self.parts) + 1, buffer)
        )
        future.add_done_callback(functools.partial(_release, self.buffers, buffer))
        self.parts.append(future)

    def _finish(self) -> None:
        if not self.parts:  # the whole file fits in one part: one PUT
            data = bytes(self.buffer[: self.fill]) if self.buffer is not None else b""
            if self.buffer is not None:
                self.buffers.release(self.buffer)
                self.buffer = None
            self.store.put(self.path, data)
            return
        if self.buffer is not None and self.fill:
            self._submit_part()
        etags = [f.result() for f in self.parts]
        assert self.upload_id is not None
        self.store._sync(self.store._complete_upload, self.path, self.upload_id, etags, self.nbytes)

    def _abort(self) -> None:
        for f in self.parts:
            f.cancel()
        concurrent.futures.wait(self.parts)
        if self.buffer is not None:
            self.buffers.release(self.buffer)
            self.buffer = None
        if self.upload_id is not None:
            try:
                self.store.abort_upload(Upload(self.path, self.upload_id))
            except Exception:  # best effort: recovery aborts what is left
                pass
