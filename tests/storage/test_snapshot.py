"""Snapshots: exact copies in reused buffers, aliases kept, steady state allocates nothing."""

import io
from collections import OrderedDict

import pytest
import torch

from ksuit.storage.snapshot import SnapshotBuffer, SnapshotPool, take_snapshot


def _payloads():
    base = torch.randn(10, 10)
    weights = OrderedDict(
        w=base, w_tied=base, row=base[3], t=base.t(), i=torch.arange(5), e=torch.zeros(0, 2)
    )
    optim = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(7)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    return [{"state_dict": weights, "tag": "E1", "it": (1, 2)}, optim]


def test_snapshot_is_an_independent_exact_copy():
    payloads = _payloads()
    snap = take_snapshot(payloads, SnapshotBuffer())
    sd, ssd = payloads[0]["state_dict"], snap[0]["state_dict"]
    assert isinstance(ssd, OrderedDict) and list(ssd) == list(sd)
    for key in sd:
        assert torch.equal(ssd[key], sd[key]) and ssd[key].dtype == sd[key].dtype, key
    assert snap[0]["tag"] == "E1" and snap[0]["it"] == (1, 2)
    assert snap[1]["param_groups"] == payloads[1]["param_groups"]
    assert snap[1]["param_groups"] is not payloads[1]["param_groups"]
    before = ssd["w"].clone()
    sd["w"].add_(1.0)  # training goes on in place
    payloads[1]["state"][0]["m"].zero_()
    assert torch.equal(ssd["w"], before)
    assert not torch.equal(snap[1]["state"][0]["m"], payloads[1]["state"][0]["m"])


def test_aliases_stay_aliases_and_views_are_copied_per_view():
    snap = take_snapshot(_payloads(), SnapshotBuffer())[0]["state_dict"]
    assert snap["w"] is snap["w_tied"]
    assert snap["row"].shape == (10,) and snap["t"].shape == (10, 10)
    assert snap["w"].data_ptr() != snap["row"].data_ptr()


def test_each_file_gets_its_own_exactly_sized_storage():
    snap = take_snapshot(_payloads(), SnapshotBuffer())
    s0 = snap[0]["state_dict"]["w"].untyped_storage()
    s1 = snap[1]["state"][0]["m"].untyped_storage()
    assert s0.data_ptr() != s1.data_ptr()
    assert s1.nbytes() == 64 + 28  # step (4 bytes, padded to 64) then m (28 bytes): no trailing padding


def test_each_dtype_of_a_file_gets_its_own_storage_and_the_file_loads():
    # a trainer state: float, int64 and uint8 tensors in one file; torch refuses one storage
    # viewed as several dtypes, so each dtype needs its own
    payload = {
        "w": torch.randn(5),
        "counter": torch.tensor(7),
        "rng": torch.get_rng_state(),
        "flags": torch.tensor([True, False]),
        "steps": torch.arange(4),
        "half": torch.randn(3).half(),
    }
    snap = take_snapshot([payload], SnapshotBuffer())[0]
    storages = {}
    for t in snap.values():
        storages.setdefault(t.dtype, set()).add(t.untyped_storage().data_ptr())
    assert all(len(ptrs) == 1 for ptrs in storages.values())  # one region per dtype ...
    all_ptrs = [next(iter(p)) for p in storages.values()]
    assert len(set(all_ptrs)) == len(all_ptrs)  # ... each a storage of its own
    buf = io.BytesIO()
    torch.save(snap, buf)  # torch.save itself accepts it
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for key, value in payload.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_padding_between_tensors_is_zero_not_stale_bytes():
    buffer = SnapshotBuffer()
    take_snapshot([{"big": torch.full((1000,), -1.0)}], buffer)  # the buffer now holds 0xff.. bytes
    snap = take_snapshot([{"a": torch.ones(3), "b": torch.ones(3)}], buffer)[0]
    region = snap["a"].untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8).set_(region)
    assert raw.numel() == 64 + 12
    assert raw[12:64].eq(0).all()  # the padding after "a"


def test_steady_state_reuses_buffers_and_views():
    payloads = _payloads()
    buffer = SnapshotBuffer()
    first = take_snapshot(payloads, buffer)
    ptrs = [b.data_ptr() for b in buffer.buffers]
    payloads[0]["state_dict"]["w"].mul_(2)
    second = take_snapshot(payloads, buffer)
    assert [b.data_ptr() for b in buffer.buffers] == ptrs
    assert second[0]["state_dict"]["w"] is first[0]["state_dict"]["w"]  # no new tensors
    assert torch.equal(second[0]["state_dict"]["w"], payloads[0]["state_dict"]["w"])
    # a different layout (a bigger tensor) grows the buffer instead of corrupting the old views
    payloads[1]["state"][0]["m"] = torch.randn(10_000)
    third = take_snapshot(payloads, buffer)
    assert torch.equal(third[1]["state"][0]["m"], payloads[1]["state"][0]["m"])


def test_sparse_tensors_are_cloned():
    sparse = torch.eye(3).to_sparse()
    snap = take_snapshot([{"s": sparse}], SnapshotBuffer())[0]["s"]
    assert snap.is_sparse and torch.equal(snap.to_dense(), torch.eye(3))


def test_pool_validates_and_blocks():
    with pytest.raises(ValueError, match="max_pending"):
        SnapshotPool(0)
    pool = SnapshotPool(1)
    assert pool.free_count == 1 and len(pool.buffers) == 1
    buffer = pool.acquire()
    assert pool.free_count == 0 and pool.buffers == (buffer,)
    with pytest.raises(TimeoutError):
        pool.acquire(timeout=0.05)
    pool.release(buffer)
    assert pool.free_count == 1
    assert pool.acquire(timeout=0.05) is buffer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_snapshotted_into_pinned_host_memory():
    w = torch.randn(1000, 100, device="cuda")
    buffer = SnapshotBuffer()
    snap = take_snapshot([{"state_dict": {"w": w}}], buffer)[0]["state_dict"]["w"]
    assert snap.device.type == "cpu" and buffer.buffers[0].is_pinned()
    expected = w.cpu()
    w.add_(1.0)  # the GPU keeps training
    assert torch.equal(snap, expected)


def test_the_same_tensors_in_two_files_share_one_region_and_copy_once():
    # a save of the weights under a progress tag and under `latest`: the same tensors twice
    weights = OrderedDict(a=torch.randn(100), b=torch.randn(50), n=torch.tensor(3))
    buffer = SnapshotBuffer()
    progress, latest = take_snapshot([{"state_dict": weights}, {"state_dict": dict(weights)}], buffer)
    for key in weights:
        assert torch.equal(progress["state_dict"][key], weights[key])
        assert progress["state_dict"][key] is latest["state_dict"][key]  # one copy, held once
    assert buffer.nbytes == 704 + 64  # a (400 B, padded to 448) and b (200 B) in one region, n alone


def test_many_small_and_large_tensors_of_mixed_dtypes_are_copied_exactly():
    # enough small bytes to split over threads, a tensor over LARGE_COPY_BYTES, several dtypes,
    # views with strides and offsets, and the same tensors in two files
    from ksuit.storage.copies import LARGE_COPY_BYTES

    g = torch.Generator().manual_seed(0)
    small = [torch.randn(4096, generator=g) for _ in range(300)]  # 4.7 MiB of 16 KiB tensors
    base = torch.randn(64, 64, generator=g)
    payload = {
        "small": small,
        "big": torch.randn(LARGE_COPY_BYTES // 4 + 7, generator=g),
        "half": [t.half() for t in small[:20]],
        "ints": torch.arange(1000, dtype=torch.int32),
        "t": base.t(),
        "cols": base[:, 1::3],
    }
    buffer = SnapshotBuffer()
    first, again = take_snapshot([payload, {"small": small[:50]}], buffer)
    for snap in (first, again):
        for i, t in enumerate(snap["small"]):
            assert torch.equal(t, small[i]), i
    assert torch.equal(first["big"], payload["big"]) and torch.equal(first["ints"], payload["ints"])
    assert all(torch.equal(h, s.half()) for h, s in zip(first["half"], small, strict=False))
    assert torch.equal(first["t"], base.t()) and torch.equal(first["cols"], base[:, 1::3])
    for t in small:
        t.add_(1.0)  # training goes on in place: the next save copies the new values, same plan
    second = take_snapshot([payload, {"small": small[:50]}], buffer)[0]
    assert buffer.plans_made == 1
    assert all(torch.equal(t, s) for t, s in zip(second["small"], small, strict=True))


def test_a_changed_tensor_makes_the_next_save_plan_again():
    weights = {"a": torch.ones(10), "b": torch.zeros(3)}
    buffer = SnapshotBuffer()
    take_snapshot([weights], buffer)
    take_snapshot([weights], buffer)
    assert buffer.plans_made == 1
    weights["b"] = torch.zeros(4)  # replaced (another shape, another address)
    snap = take_snapshot([weights], buffer)[0]
    assert buffer.plans_made == 2 and snap["b"].shape == (4,)
    weights["a"] = weights["a"].to(torch.float64)  # another dtype
    snap = take_snapshot([weights], buffer)[0]
    assert buffer.plans_made == 3 and snap["a"].dtype == torch.float64
    weights["extra"] = torch.ones(2)  # one tensor more
    snap = take_snapshot([weights], buffer)[0]
    assert buffer.plans_made == 4 and torch.equal(snap["extra"], torch.ones(2))
    snap = take_snapshot([{"a": weights["a"]}], buffer)[0]  # one tensor less
    assert buffer.plans_made == 5 and list(snap) == ["a"]


def test_a_forked_child_takes_snapshots_too():
    # the copy helper threads stay in the parent; a child must not wait on their queues (tensors
    # under torch's grain size: a parallel torch op in a forked child hangs in OpenMP, ksuit or not)
    import os
    import time

    small = {f"t{i}": torch.full((1 << 14,), float(i)) for i in range(100)}  # 6.4 MiB: 2 threads
    take_snapshot([small], SnapshotBuffer())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = all(torch.equal(v, small[k]) for k, v in take_snapshot([small], SnapshotBuffer())[0].items())
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child never finished its snapshot")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
