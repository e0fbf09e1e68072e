"""`AsyncSetWriter`: in-order background writes with the same guarantees as `SetWriter`."""

import threading

import pytest
import torch

from ksuit.storage import PendingFile
from ksuit.storage import formats as formats_module
from ksuit.storage.async_writer import AsyncSetWriter
from ksuit.storage.formats import TorchFormat
from ksuit.storage.manifest import read_manifest


class _Recording(TorchFormat):
    def __init__(self):
        super().__init__()
        self.order = []
        self.lock = threading.Lock()

    def write(self, payload, sink):
        with self.lock:
            self.order.append(payload.get("n"))
        super().write(payload, sink)


def _file(n, tag="latest"):
    return PendingFile(
        f"net_cp={tag}_model.th",
        {"n": n, "w": torch.full((100,), float(n))},
        "torch",
        "model",
        "net",
        tag,
        {"epoch": n, "update": n, "sample": n},
    )


def test_writes_run_in_submission_order_and_last_latest_wins(tmp_path, monkeypatch):
    fmt = _Recording()
    monkeypatch.setitem(formats_module.FORMATS, "torch", fmt)
    writer = AsyncSetWriter(tmp_path, max_pending=3)
    written = []
    for n in range(8):
        writer.write_set([_file(n)], run_id="r", on_written=lambda w, n=n: written.append(n))
    writer.close()
    assert fmt.order == list(range(8)) and written == list(range(8))
    payload = torch.load(tmp_path / "net_cp=latest_model.th", weights_only=True)
    assert payload["n"] == 7 and torch.equal(payload["w"], torch.full((100,), 7.0))
    assert read_manifest(tmp_path / "net_cp=latest.manifest.json").training_iteration["epoch"] == 7


def test_error_is_raised_once_then_writer_goes_on(tmp_path, monkeypatch):
    class Failing(TorchFormat):
        def write(self, payload, sink):
            raise ValueError("boom")

    monkeypatch.setitem(formats_module.FORMATS, "torch", Failing())
    writer = AsyncSetWriter(tmp_path)
    writer.write_set([_file(1)])
    with pytest.raises(ValueError, match="boom"):
        writer.flush()
    writer.flush()  # reported once
    monkeypatch.setitem(formats_module.FORMATS, "torch", TorchFormat())
    writer.write_set([_file(2)])
    writer.close()
    assert torch.load(tmp_path / "net_cp=latest_model.th", weights_only=True)["n"] == 2


def test_closed_writer_refuses_and_close_is_idempotent(tmp_path):
    writer = AsyncSetWriter(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_set([_file(1)])
