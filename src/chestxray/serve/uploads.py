"""Read one multipart upload into memory, with a size limit enforced while reading.

Why not FastAPI's `UploadFile`: Starlette parses multipart into a SpooledTemporaryFile
that rolls over to a file on disk past 1 MB, and it reads the whole body before a
handler can check its size. Radiographs are medical data and must never touch the
disk, and an upload limit should stop a client early. So the handlers take the raw
request stream, count bytes as they arrive (413 as soon as the limit is passed), and
feed python-multipart's streaming parser, keeping only the bytes of the `file` part in
a bytearray. The client's file name is read by the parser but never stored.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "file"
#: Room for the multipart envelope (boundaries, part headers, small extra fields).
FORM_OVERHEAD = 64 * 1024
MAX_PARTS = 8
#: Longest part header line kept by the parser: a long client file name is read and ignored,
#: not refused (python-multipart's default of 4 KiB made it a "malformed" body).
MAX_PART_HEADER = 64 * 1024


class BodyTimeout(Exception):
    """The client did not send its body within the limit (`slow`: it fell below the minimum rate)."""

    def __init__(self, slow: bool = False) -> None:
        super().__init__()
        self.slow = slow


class UploadError(Exception):
    """A bad upload: `status` is the HTTP status to answer with, `message` says why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _FileCollector:
    """python-multipart callbacks that keep the data of the one part named `field`."""

    def __init__(self, field: str, max_bytes: int) -> None:
        self.field = field.encode()
        self.max_bytes = max_bytes
        self.data = bytearray()
        self.seen = 0
        self.complete = False
        self.parts = 0
        self._collecting = False
        self._headers: dict[bytes, bytes] = {}
        self._name: list[bytes] = []
        self._value: list[bytes] = []

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._name.append(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.append(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadError(400, f"too many form fields (at most {MAX_PARTS})")
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[b"".join(self._name).lower()] = b"".join(self._value).strip()
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._collecting = options.get(b"name") == self.field
        if self._collecting:
            self.seen += 1
            if self.seen > 1:
                raise UploadError(422, f"send exactly one form field {self.field.decode()!r}")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._collecting:
            return
        if len(self.data) + (end - start) > self.max_bytes:
            raise UploadError(413, _too_large(self.max_bytes))
        self.data += data[start:end]

    def _part_end(self) -> None:
        if self._collecting:
            self.complete = True
            self._collecting = False


def _too_large(max_bytes: int) -> str:
    return f"the upload is larger than the server's limit of {max_bytes / 2**20:.4g} MiB"


def check_upload_headers(
    content_type: str | None, content_length: str | None, max_bytes: int, field: str = FIELD
) -> bytes:
    """The multipart boundary, after the checks that need no body: 415 if not multipart,
    400 without a boundary, 413 when Content-Length is already past the limit."""
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UploadError(415, f"send the image as multipart/form-data in the form field {field!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    length = (content_length or "").strip()
    if length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD:
        raise UploadError(413, _too_large(max_bytes))
    return boundary


def _parser(boundary: bytes, collector: _FileCollector) -> MultipartParser:
    try:
        return MultipartParser(boundary, collector.callbacks(), max_header_size=MAX_PART_HEADER)  # type: ignore[arg-type]
    except TypeError:  # python-multipart < 0.0.19 has no header size limit to raise
        return MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]


async def read_file_field(
    content_type: str | None,
    content_length: str | None,
    stream: AsyncIterator[bytes],
    max_bytes: int,
    field: str = FIELD,
    timeout_s: float | None = None,
    min_rate: float = 0.0,
    grace_s: float = 0.0,
) -> bytes:
    """The bytes of form field `field` of a multipart/form-data body, read from `stream`.

    Raises UploadError: 415 if the body is not multipart, 413 past `max_bytes` (checked
    on Content-Length first, then while reading), 422 if the field is missing or
    repeated, 400 if the multipart body is malformed or cut short, 408 (with
    `Connection: close`) when the whole body has not arrived within `timeout_s` seconds,
    or arrives slower than `min_rate` bytes/s on average once `grace_s` seconds have
    passed; what was read so far is dropped.
    """
    boundary = check_upload_headers(content_type, content_length, max_bytes, field)
    body_limit = max_bytes + FORM_OVERHEAD
    collector = _FileCollector(field, max_bytes)
    start = time.monotonic()
    deadline = math.inf if timeout_s is None else start + timeout_s
    chunks = stream.__aiter__()
    try:
        parser = _parser(boundary, collector)
        total = 0
        while True:
            # The next bytes must come before the body deadline, and before the moment when
            # what has arrived falls below the minimum rate.
            slow_at = start + grace_s + total / min_rate if min_rate > 0 else math.inf
            wait = min(deadline, slow_at) - time.monotonic()
            try:
                if wait == math.inf:
                    chunk = await chunks.__anext__()
                else:
                    chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, wait))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise BodyTimeout(slow=slow_at < deadline) from None
            total += len(chunk)
            if total > body_limit:
                raise UploadError(413, _too_large(max_bytes), {"Connection": "close"})
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except UploadError:
        collector.data = bytearray()
        raise
    except BodyTimeout as exc:
        collector.data = bytearray()  # drop the half-read upload now, not when the client goes
        why = f"arrived slower than {min_rate / 1024:g} KiB/s" if exc.slow else f"did not arrive within {timeout_s:g} s"
        raise UploadError(408, f"the upload {why}; send it again", {"Connection": "close"}) from None
    except Exception as exc:  # python-multipart's parse errors (several types)
        raise UploadError(400, f"malformed multipart/form-data body ({type(exc).__name__})") from None
    if collector.seen == 0:
        raise UploadError(422, f"no form field {field!r}: send the image as the form field {field!r}")
    if not collector.complete:
        raise UploadError(400, "the multipart/form-data body ends before the file does")
    return bytes(collector.data)
