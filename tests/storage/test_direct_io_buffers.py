"""The O_DIRECT bounce buffers a thread keeps follow `BOUNCE_BYTES`: buffers made while it had
another value (a test lowering it) are not reused at the wrong size, which corrupted the next
large stream of that thread."""

from __future__ import annotations

import pytest
import torch

from ksuit.storage.formats import torch_save
from ksuit.storage.local import direct_io
from ksuit.storage.local.files import HashingSink


def test_buffers_made_at_another_size_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KSUIT_DIRECT_IO", "1")
    with monkeypatch.context() as small:
        small.setattr(direct_io, "BOUNCE_BYTES", 3 * direct_io.BLOCK)
        direct_io._bounce_buffers()  # this thread now holds small buffers
    assert all(len(b) == direct_io.BOUNCE_BYTES for b in direct_io._bounce_buffers())
    tensors = [torch.arange(5 << 20, dtype=torch.float32) + i for i in range(2)]  # 2 x 20 MiB
    sink = HashingSink(tmp_path / "f")
    with direct_io.open_stream(sink, direct_io.MIN_DIRECT_BYTES) as out:
        if not isinstance(out, direct_io.DirectStream):
            pytest.skip("this file system takes no O_DIRECT writes")
        for t in tensors:  # two archives in one stream, as a sharded checkpoint's part holds
            torch_save(t, out)
    sink.fsync_and_close()
    data = (tmp_path / "f").read_bytes()
    assert sink.nbytes == len(data)
