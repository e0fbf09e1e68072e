"""Builders of hostile checkpoint files, made from scratch byte by byte (no network, no fixtures).

Each builder returns the bytes of a file that is small on disk but would, if trusted, hang a
reader, exhaust its memory or CPU, replace data, or crash it with a traceback.
"""

from __future__ import annotations

import io
import json
import random
import struct
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

# --- pickle opcodes (protocol 2, what torch.save writes) ---------------------------------------
PROTO2 = b"\x80\x02"
STOP = b"."
MARK = b"("
EMPTY_LIST, EMPTY_DICT, EMPTY_TUPLE = b"]", b"}", b")"
APPEND, SETITEM, SETITEMS = b"a", b"s", b"u"
TUPLE, TUPLE1, TUPLE2 = b"t", b"\x85", b"\x86"
REDUCE, BUILD, BINPERSID = b"R", b"b", b"Q"
NEWFALSE = b"\x89"


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def uni(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def binint(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def pickle_of(body: bytes) -> bytes:
    return PROTO2 + body + STOP


def dag_bomb(levels: int = 60) -> bytes:
    """list_k = [list_{k-1}, list_{k-1}]: ~10 bytes per level, 2**levels nodes as a tree."""
    body = EMPTY_LIST + put(0)
    for k in range(1, levels + 1):
        body += EMPTY_LIST + put(k) + get(k - 1) + APPEND + get(k - 1) + APPEND
    return pickle_of(body)


def bytearray_bomb(nbytes: int = 1536 << 20) -> bytes:
    """`bytearray(nbytes)` through an allowed global: 30 bytes that ask for 1.5 GiB."""
    return pickle_of(glob("__builtin__", "bytearray") + binint(nbytes) + TUPLE1 + REDUCE)


def cycle() -> bytes:
    """A list that contains itself."""
    return pickle_of(EMPTY_LIST + put(0) + get(0) + APPEND)


def deep_nesting(depth: int = 5000) -> bytes:
    """[[[[...]]]] `depth` levels deep (recursive walkers die of RecursionError)."""
    return pickle_of(EMPTY_LIST * depth + APPEND * (depth - 1))


def code_call() -> bytes:
    """os.system('true'): a global outside every allowlist."""
    return pickle_of(glob("os", "system") + uni("true") + TUPLE1 + REDUCE)


def tensor_pickle(numel: int = 2, size: int = 2, key: str = "0") -> bytes:
    """{'w': float tensor of `size` elements on storage `key` that claims `numel` elements}."""
    storage = (
        MARK + uni("storage") + glob("torch", "FloatStorage") + uni(key) + uni("cpu") + binint(numel) + TUPLE
    )
    hooks = glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    args = (
        MARK
        + storage
        + BINPERSID
        + binint(0)
        + binint(size)
        + TUPLE1
        + binint(1)
        + TUPLE1
        + NEWFALSE
        + hooks
        + TUPLE
    )
    tensor = glob("torch._utils", "_rebuild_tensor_v2") + args + REDUCE
    return pickle_of(EMPTY_DICT + uni("w") + tensor + SETITEM)


def torch_zip(
    data_pkl: bytes | None, records: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()
) -> bytes:
    """A torch-style zip archive (`archive/...`), records STORED unless named in `deflate`;
    no data.pkl when `data_pkl` is None."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        entries = {".format_version": b"1", "byteorder": b"little", "version": b"3\n"}
        if data_pkl is not None:
            entries = {"data.pkl": data_pkl, **entries}
        entries.update(records or {})
        for name, data in entries.items():
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(zipfile.ZipInfo(f"archive/{name}"), data, compress_type=method)
    return buf.getvalue()


def deflate_bomb_zip(inflated: int = 256 << 20) -> bytes:
    """A valid pickle of one tensor whose storage record inflates to `inflated` zero bytes."""
    numel = inflated // 4
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", tensor_pickle(numel, numel))
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            chunk = bytes(16 << 20)
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def patch_central_entry(
    archive: bytes, name: str, size: int | None = None, offset: int | None = None
) -> bytes:
    """The archive with the central directory entry of `name` claiming another size or offset."""
    raw = f"archive/{name}".encode()
    pos = 0
    while True:
        pos = archive.index(b"PK\x01\x02", pos)
        nlen = struct.unpack_from("<H", archive, pos + 28)[0]
        if archive[pos + 46 : pos + 46 + nlen] == raw:
            break
        pos += 4
    data = bytearray(archive)
    if size is not None:
        struct.pack_into("<II", data, pos + 20, size, size)
    if offset is not None:
        struct.pack_into("<I", data, pos + 42, offset)
    return bytes(data)


def local_offset(archive: bytes, name: str) -> int:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.getinfo(f"archive/{name}").header_offset


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(n)
    return b"\x00" + data[1:]  # never starts like a zip or a pickle


# --- safetensors --------------------------------------------------------------------------------


def safetensors_bytes(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def good_tensor_header(**overrides: object) -> dict:
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    entry.update(overrides)
    return {"w": entry}


# --- waiting for calls that might hang ------------------------------------------------------------


def call_with_deadline(fn: Callable[[], object], fifos: tuple[Path, ...] = (), seconds: float = 60) -> object:
    """Runs `fn` in a thread; if it has not returned by the deadline (a reader blocked on a FIFO),
    unblocks the FIFOs by opening them for writing and fails. Returns fn's result or re-raises."""
    import os

    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for a blocked reader
            except OSError:
                pass
        thread.join(10)
        raise AssertionError(f"{fn} did not return within {seconds} s: it blocked on a special file")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")
