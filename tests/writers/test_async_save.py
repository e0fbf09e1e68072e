"""Asynchronous saving through `CheckpointWriter(async_save=True)`: snapshots, order, errors,
backpressure, buffer reuse and the flush at interpreter exit."""

import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ksuit.readers import list_checkpoints, select_resume_set
from ksuit.storage import formats as formats_module
from ksuit.storage.formats import TorchFormat
from ksuit.storage.loading import load_file
from ksuit.storage.manifest import read_manifest, verify_file
from ksuit.storage.snapshot import SnapshotPool
from ksuit.writers import CheckpointWriter
from ksuit.zoo.autoencoder import Autoencoder
from tests.conftest import FakeTrainer, assert_bitwise_equal, autoencoder_config, train_one_step

REPO = Path(__file__).resolve().parents[2]


class GatedFormat(TorchFormat):
    """A torch format whose writes wait for `gate`, so a test controls when the disk 'catches up'."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.writes = 0

    def write(self, payload, sink) -> None:
        self.started.set()
        assert self.gate.wait(30), "test never opened the gate"
        self.writes += 1
        super().write(payload, sink)


class FailingFormat(TorchFormat):
    def write(self, payload, sink) -> None:
        raise OSError(5, "simulated I/O error during background write")


@pytest.fixture
def model():
    m = Autoencoder(autoencoder_config()).initialize()
    train_one_step(m)
    return m


@pytest.fixture
def gated(monkeypatch):
    fmt = GatedFormat()
    monkeypatch.setitem(formats_module.FORMATS, "torch", fmt)
    yield fmt
    fmt.gate.set()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_file_holds_values_at_save_time_while_training_changes_them(
    path_provider, update_counter, model, gated
):
    writer = CheckpointWriter(path_provider, update_counter, async_save=True)
    before = _weights(model.encoder)
    optim_before = model.encoder.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    writer.save(model, "E1_U20_S80")  # returns while the write waits on the gate
    assert gated.started.wait(10)
    with torch.no_grad():  # training continues in place
        for p in model.parameters():
            p.add_(1000.0)
        model.encoder.optimizer.state_dict()["state"][0]["exp_avg"].add_(5.0)
    gated.gate.set()
    writer.flush()
    folder = path_provider.checkpoint_path
    saved = load_file(folder / "autoencoder.encoder_cp=E1_U20_S80_model.th")["state_dict"]
    for key, value in before.items():
        assert torch.equal(saved[key], value), key
    optim = load_file(folder / "autoencoder.encoder_cp=E1_U20_S80_optim.th")
    assert torch.equal(optim["state"][0]["exp_avg"], optim_before)
    writer.close()


def test_snapshot_buffers_are_reused_across_saves(path_provider, update_counter, model):
    writer = CheckpointWriter(path_provider, update_counter, async_save=True, max_pending=1)
    ptrs = []
    for i in range(3):
        writer.save(model, f"E{i}_U0_S0", save_latest_weights=True)
        writer.flush()
        (buffer,) = writer.snapshot_pool.buffers
        ptrs.append([b.data_ptr() for b in buffer.buffers])
    assert ptrs[0] and ptrs[0] == ptrs[1] == ptrs[2]
    writer.close()


def test_saves_complete_in_order_and_latest_is_the_newest(path_provider, update_counter, model, gated):
    writer = CheckpointWriter(path_provider, update_counter, async_save=True, max_pending=3)
    gated.gate.set()
    expected = None
    for epoch in range(1, 6):
        update_counter.next_epoch()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(epoch))
        expected = _weights(model.decoder)
        writer.save(model, f"E{epoch}_U0_S0", save_latest_weights=True, save_latest_optim=True)
    writer.close()
    folder = path_provider.checkpoint_path
    latest = load_file(folder / "autoencoder.decoder_cp=latest_model.th")
    assert latest["training_iteration"]["epoch"] == 5
    for key, value in expected.items():
        assert torch.equal(latest["state_dict"][key], value)
    manifest = read_manifest(folder / "autoencoder_cp=latest.manifest.json")
    assert manifest.training_iteration["epoch"] == 5
    for name, entry in manifest.files.items():
        assert verify_file(folder, name, entry) is None, name
    tags = {c.tag for c in list_checkpoints(path_provider.run_output_path)}
    assert tags == {"E1_U0_S0", "E2_U0_S0", "E3_U0_S0", "E4_U0_S0", "E5_U0_S0", "latest"}


def test_backpressure_at_most_max_pending_snapshots(path_provider, update_counter, model, gated, monkeypatch):
    acquires = []  # one (entered, returned) pair of events per acquire()
    original_acquire = SnapshotPool.acquire

    def acquire(self, timeout=None):
        entered, returned = threading.Event(), threading.Event()
        acquires.append((entered, returned))
        entered.set()
        buffer = original_acquire(self, timeout)
        returned.set()
        return buffer

    monkeypatch.setattr(SnapshotPool, "acquire", acquire)
    writer = CheckpointWriter(path_provider, update_counter, async_save=True, max_pending=2)
    done = []

    def saver():
        for i in range(4):
            writer.save(model, f"E{i}_U0_S0")
            done.append(i)

    t = threading.Thread(target=saver, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while len(acquires) < 3:  # the third save() asks for a buffer
        assert time.monotonic() < deadline, "the third save never asked for a snapshot buffer"
        time.sleep(0.01)
    # the first save is being written (blocked on the gate), the second waits in the queue;
    # both buffers are in flight, so the third save() waits while the gate is closed
    assert done == [0, 1]
    assert writer.snapshot_pool.free_count == 0
    assert not acquires[2][1].wait(0.2)
    gated.gate.set()
    t.join(30)
    assert done == [0, 1, 2, 3]
    writer.flush()
    pool = writer.snapshot_pool
    assert pool.free_count == len(pool.buffers) == 2  # never more than max_pending buffers
    writer.close()


def test_failed_background_write_raises_on_next_save_and_flush(
    path_provider, update_counter, model, monkeypatch
):
    monkeypatch.setitem(formats_module.FORMATS, "torch", FailingFormat())
    writer = CheckpointWriter(path_provider, update_counter, async_save=True)
    writer.save(model, "E1_U0_S0")  # returns; the failure happens in the background
    with pytest.raises(OSError, match="simulated I/O error") as info:
        writer.flush()
    assert "background checkpoint write" in "".join(info.value.__notes__)
    writer.save(model, "E2_U0_S0")
    # the next save waits for E2's buffer (max_pending=1), so E2's failure is known by then
    with pytest.raises(OSError, match="simulated I/O error"):
        writer.save(model, "E3_U0_S0")
    folder = path_provider.checkpoint_path
    assert not [p for p in folder.iterdir() if p.name.endswith(".th")]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # temps removed
    monkeypatch.setitem(formats_module.FORMATS, "torch", TorchFormat())
    writer.save(model, "E4_U0_S0")  # the writer is usable again once the error was reported
    writer.close()
    assert (folder / "autoencoder.encoder_cp=E4_U0_S0_model.th").exists()


def test_close_flushes_and_rejects_later_saves_on_the_old_worker(path_provider, update_counter, model, gated):
    writer = CheckpointWriter(path_provider, update_counter, async_save=True)
    writer.save(model, "E1_U0_S0", trainer=FakeTrainer(update_counter))
    threading.Timer(0.3, gated.gate.set).start()
    writer.close()  # waits for the gated write
    s, skipped = select_resume_set(path_provider.run_output_path, "autoencoder")
    assert s.tag == "E1_U0_S0" and s.ok


_EXIT_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from ksuit.providers import PathProvider
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.storage import formats
from ksuit.writers import CheckpointWriter

class Slow(formats.TorchFormat):
    def write(self, payload, sink):
        time.sleep(0.3)
        super().write(payload, sink)

formats.FORMATS["torch"] = Slow()
uc = UpdateCounter(None, TrainingIteration(epoch=3), updates_per_epoch=2, effective_batch_size=1)
w = CheckpointWriter(PathProvider({out!r}, "run"), uc, async_save=True, max_pending=2)
for i in range(3):
    tag = f"E{{i}}_U0_S0"
    w.save_model_checkpoint(f"net_cp={{tag}}_model.th", {{"w": torch.full((256, 256), float(i))}}, tag)
print("returned", flush=True)
"""


def test_interpreter_exit_flushes_pending_saves(tmp_path):
    out = tmp_path / "out"
    script = _EXIT_SCRIPT.format(repo=str(REPO / "src"), out=str(out))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start > 0.9  # the three slow writes ran before exit
    folder = out / "run" / "checkpoints"
    for i in range(3):
        payload = torch.load(folder / f"net_cp=E{i}_U0_S0_model.th", weights_only=True)
        assert torch.equal(payload["state_dict"]["w"], torch.full((256, 256), float(i)))
        manifest = read_manifest(folder / f"net_cp=E{i}_U0_S0.manifest.json")
        assert set(manifest.files) == {f"net_cp=E{i}_U0_S0_model.th"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_async_files_carry_no_stale_bytes_of_earlier_larger_saves(path_provider, update_counter):
    writer = CheckpointWriter(path_provider, update_counter, async_save=True)
    writer.save_model_checkpoint("big_cp=E0_U0_S0_model.th", {"w": torch.ones(1 << 20)}, "E0_U0_S0")
    writer.flush()
    writer.save_model_checkpoint("small_cp=E0_U0_S0_model.th", {"w": torch.ones(10)}, "E0_U0_S0")
    writer.close()
    folder = path_provider.checkpoint_path
    assert (folder / "small_cp=E0_U0_S0_model.th").stat().st_size < 64 * 1024
    assert torch.equal(load_file(folder / "small_cp=E0_U0_S0_model.th")["state_dict"]["w"], torch.ones(10))


def _rich_state_dict(safetensors: bool) -> OrderedDict:
    """Every kind of tensor a synchronous save stores: mixed dtypes (a trainer state holds int64
    and uint8 RNG tensors, a BatchNorm an int64 counter), 0-dim, empty, views, aliases."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    sd = OrderedDict(
        f32=base,
        tied=base,  # the same tensor twice
        row=base[2],  # views of base: same storage, other offsets and strides
        t=base.t(),
        strided=base[:, ::2],
        f64=torch.randn(5, dtype=torch.float64, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(5, generator=g).bfloat16(),
        i64=torch.arange(7),
        i32=torch.arange(3, dtype=torch.int32),
        i16=torch.arange(3, dtype=torch.int16),
        i8=torch.arange(-3, 3, dtype=torch.int8),
        rng=torch.get_rng_state(),  # uint8
        flags=torch.tensor([True, False, True]),
        num_batches_tracked=torch.tensor(7),  # 0-dim int64
        scalar=torch.tensor(1.5),
        empty=torch.zeros(0, 3),
        empty_int=torch.zeros(0, dtype=torch.int64),
        param=torch.nn.Parameter(torch.randn(3, generator=g)),
    )
    if not safetensors:  # dtypes and kinds safetensors does not store
        sd["c64"] = torch.randn(3, dtype=torch.complex64, generator=g)
        sd["c128"] = torch.randn(2, dtype=torch.complex128, generator=g)
        sd["grad"] = torch.randn(2, generator=g).requires_grad_()
        sd["meta"] = torch.empty(4, device="meta")
    return sd


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_async_saves_every_payload_sync_saves_with_the_same_values(tmp_path, update_counter, fmt):
    from ksuit.providers import PathProvider

    ext = "safetensors" if fmt == "safetensors" else "th"
    name = f"net_cp=E1_U0_S0_model.{ext}"
    files = {}
    for mode in ("sync", "async"):
        sd = _rich_state_dict(safetensors=fmt == "safetensors")
        provider = PathProvider(tmp_path / mode, "run")
        with CheckpointWriter(provider, update_counter, async_save=mode == "async", format=fmt) as writer:
            writer.save_model_checkpoint(name, sd, "E1_U0_S0", note="x")
        files[mode] = provider.checkpoint_path / name
        assert read_manifest(provider.checkpoint_path / "net_cp=E1_U0_S0.manifest.json").files
    if fmt == "torch":  # plain torch, no ksuit: what a user without ksuit gets
        sync, loaded = (torch.load(files[m], weights_only=True) for m in ("sync", "async"))
    else:
        sync, loaded = (load_file(files[m]) for m in ("sync", "async"))
    assert loaded.keys() == sync.keys() and loaded["note"] == "x"
    expected, got = sync["state_dict"], loaded["state_dict"]
    assert sorted(got) == sorted(expected)  # (safetensors loads in file order; empty tensors tie)
    for key, want in expected.items():
        have = got[key]
        assert (type(have), have.dtype, have.shape, have.device, have.requires_grad) == (
            type(want),
            want.dtype,
            want.shape,
            want.device,
            want.requires_grad,
        ), key
        if want.device.type != "meta":
            assert torch.equal(_bytes(have), _bytes(want)), key
    if fmt == "torch":
        assert got["tied"] is got["f32"]  # an alias stays one tensor, as in the sync file


def test_async_trainer_state_with_mixed_dtype_rng_is_saved(path_provider, update_counter, model):
    """The trainer file holds int64 and uint8 tensors next to each other: the first async save of
    every training run."""

    class Trainer(FakeTrainer):
        def state_dict(self):
            state = super().state_dict()
            state["rng"]["seed"] = torch.tensor(1234)
            state["rng"]["cuda"] = [torch.get_rng_state()]
            return state

    with CheckpointWriter(path_provider, update_counter, async_save=True) as writer:
        writer.save(model, "E1_U0_S0", trainer=Trainer(update_counter))
    folder = path_provider.checkpoint_path
    state = torch.load(folder / "autoencoder_cp=E1_U0_S0_trainer.th", weights_only=True)
    assert state["rng"]["seed"].item() == 1234 and state["rng"]["torch"].dtype == torch.uint8
    s, _ = select_resume_set(path_provider.run_output_path, "autoencoder")
    assert s.tag == "E1_U0_S0" and s.ok


_BIG_EXIT_SCRIPT = """
import sys, torch
from ksuit.providers import PathProvider
from ksuit.storage.local import direct_io
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter

uc = UpdateCounter(None, TrainingIteration(epoch=3), updates_per_epoch=2, effective_batch_size=1)
w = CheckpointWriter(PathProvider({out!r}, "run"), uc, async_save=True, max_pending=3)
numel = (direct_io.MIN_DIRECT_BYTES + (1 << 20)) // 4  # 33 MiB: written with O_DIRECT
for i in range(3):
    tag = f"E{{i}}_U0_S0"
    w.save_model_checkpoint(f"net_cp={{tag}}_model.th", {{"w": torch.full((numel,), float(i))}}, tag)
print("returned", flush=True)
"""


def _run_script(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )


def test_interpreter_exit_writes_queued_saves_of_large_files(tmp_path):
    # files >= 32 MiB go through O_DIRECT with a helper thread; at exit that must still work
    out = tmp_path / "out"
    proc = _run_script(_BIG_EXIT_SCRIPT.format(out=str(out)))
    assert proc.returncode == 0, proc.stderr
    assert "failed" not in proc.stderr, proc.stderr
    folder = out / "run" / "checkpoints"
    for i in range(3):
        manifest = read_manifest(folder / f"net_cp=E{i}_U0_S0.manifest.json")
        for name, entry in manifest.files.items():
            assert verify_file(folder, name, entry) is None, name
        w = torch.load(folder / f"net_cp=E{i}_U0_S0_model.th", weights_only=True, mmap=True)["state_dict"][
            "w"
        ]
        assert w.numel() * 4 > 32 << 20 and bool((w == float(i)).all())


_FAILING_EXIT_SCRIPT = """
import torch
from ksuit.providers import PathProvider
from ksuit.storage import formats
from ksuit.utils.training import TrainingIteration, UpdateCounter
from ksuit.writers import CheckpointWriter

class FailsForRunA(formats.TorchFormat):
    def write(self, payload, sink):
        if payload["run_id"] == "a":
            raise OSError(5, "simulated I/O error at exit")
        super().write(payload, sink)

formats.FORMATS["torch"] = FailsForRunA()
uc = UpdateCounter(None, TrainingIteration(epoch=3), updates_per_epoch=2, effective_batch_size=1)
for run in ("a", "b"):  # two writers: a failure in the first must not stop the second's writes
    w = CheckpointWriter(PathProvider({out!r}, run), uc, async_save=True)
    w.save_model_checkpoint("net_cp=E0_U0_S0_model.th", {{"w": torch.full((8,), 1.0)}}, "E0_U0_S0")
print("returned", flush=True)
"""


def test_a_save_failing_at_interpreter_exit_ends_the_process_with_an_error(tmp_path):
    out = tmp_path / "out"
    proc = _run_script(_FAILING_EXIT_SCRIPT.format(out=str(out)))
    assert "returned" in proc.stdout, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert "simulated I/O error at exit" in proc.stderr, proc.stderr
    assert "not on disk" in proc.stderr and str(out / "a" / "checkpoints") in proc.stderr, proc.stderr
    assert not (out / "a" / "checkpoints" / "net_cp=E0_U0_S0_model.th").exists()
    payload = torch.load(out / "b" / "checkpoints" / "net_cp=E0_U0_S0_model.th", weights_only=True)
    assert torch.equal(payload["state_dict"]["w"], torch.full((8,), 1.0))


@pytest.mark.parametrize(
    "optimizer",
    [
        {"kind": "torch.optim.AdamW", "lr": 1e-3},
        {"kind": "torch.optim.Adam", "lr": 1e-3, "amsgrad": True},
        {"kind": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        {"kind": "torch.optim.SGD", "lr": 0.1},
        {"kind": "torch.optim.RMSprop", "lr": 0.1, "momentum": 0.5, "centered": True},
        {"kind": "torch.optim.NAdam", "lr": 0.1},
        {"kind": "torch.optim.Adagrad", "lr": 0.1},
    ],
)
def test_snapshot_size_known_before_the_first_step_is_what_the_optimizer_holds_after_it(optimizer):
    from ksuit.writers.sizing import snapshot_nbytes
    from ksuit.zoo.autoencoder import AutoencoderConfig, DecoderConfig, EncoderConfig

    config = AutoencoderConfig(
        encoder=EncoderConfig(input_dim=16, hidden_dim=32, latent_dim=4, optimizer_config=optimizer),
        decoder=DecoderConfig(latent_dim=4, hidden_dim=32, output_dim=16, optimizer_config=optimizer),
    )
    model = Autoencoder(config).initialize()
    before, cuda = snapshot_nbytes(model)
    train_one_step(model)
    assert snapshot_nbytes(model) == (before, cuda) and not cuda


def test_prepare_readies_the_memory_of_the_first_save_off_the_saving_thread(path_provider, update_counter):
    model = Autoencoder(autoencoder_config()).initialize()  # no optimizer state yet, as at set-up
    writer = CheckpointWriter(path_provider, update_counter, async_save=True, max_pending=2)
    writer.prepare(model)
    pool = writer.snapshot_pool
    assert pool is not None and pool.wait_prepared(timeout=30)
    prepared = [[(s.nbytes, s.touched) for s in b.segments] for b in pool.buffers]
    assert all(len(p) == 1 and p[0][0] == p[0][1] > 0 for p in prepared)  # mapped and touched
    train_one_step(model)
    writer.save(model, "E1_U0_S0", trainer=FakeTrainer(update_counter), save_latest_weights=True)
    writer.flush()
    # the first save took its memory from the prepared segment: nothing more was allocated
    assert [[(s.nbytes, s.touched) for s in b.segments] for b in pool.buffers] == prepared
    assert sum(b.plans_made for b in pool.buffers) == 1
    for tag in ("E1_U0_S0", "latest"):
        s, _ = select_resume_set(path_provider.run_output_path, "autoencoder", tag)
        assert s.ok
    writer.close()


def test_prepare_does_nothing_for_synchronous_saving(path_provider, update_counter):
    writer = CheckpointWriter(path_provider, update_counter)
    writer.prepare(Autoencoder(autoencoder_config()).initialize())
    assert writer.snapshot_pool is None
    with pytest.raises(TypeError):
        writer.prepare(torch.nn.Linear(2, 2))


def test_two_tags_of_one_save_take_each_leaf_once_and_hold_its_snapshot_once(
    path_provider, update_counter, model, monkeypatch
):
    from collections import Counter

    from ksuit.models import Model
    from ksuit.writers.sizing import snapshot_nbytes

    calls = Counter()
    original = Model.state_dict

    def counting_state_dict(self, *args, **kwargs):
        calls[self.name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Model, "state_dict", counting_state_dict)
    with CheckpointWriter(path_provider, update_counter, async_save=True) as writer:
        writer.save(model, "E1_U0_S0", save_latest_weights=True, save_latest_optim=True)
        writer.flush()
        (buffer,) = writer.snapshot_pool.buffers
        held = buffer.nbytes
    assert calls == {"encoder": 1, "decoder": 1}
    monkeypatch.setattr(Model, "state_dict", original)
    assert held <= snapshot_nbytes(model)[0]  # weights and optimizer state once, not once per tag
    folder = path_provider.checkpoint_path
    for part in ("encoder", "decoder"):
        for role in ("model", "optim"):
            tagged = load_file(folder / f"autoencoder.{part}_cp=E1_U0_S0_{role}.th")
            latest = load_file(folder / f"autoencoder.{part}_cp=latest_{role}.th")
            tagged.pop("checkpoint_tag", None), latest.pop("checkpoint_tag", None)
            assert_bitwise_equal(tagged, latest, f"{part} {role}")


def test_async_files_of_many_small_and_large_tensors_equal_sync_files(tmp_path, update_counter):
    # the copy paths of a real state: small tensors split over threads, a large one by byte ranges
    from ksuit.providers import PathProvider
    from ksuit.storage.copies import LARGE_COPY_BYTES

    g = torch.Generator().manual_seed(1)
    sd = OrderedDict((f"w{i}", torch.randn(4096, generator=g)) for i in range(300))
    sd["big"] = torch.randn(LARGE_COPY_BYTES // 4 + 17, generator=g)
    sd["big_half"] = sd["big"][:1000].half()
    sd["ints"] = torch.arange(5000, dtype=torch.int64)
    sd["cols"] = sd["w0"].view(64, 64)[:, 1::2]
    loaded = {}
    for mode in ("sync", "async"):
        provider = PathProvider(tmp_path / mode, "run")
        with CheckpointWriter(provider, update_counter, async_save=mode == "async") as writer:
            writer.save_model_checkpoint("net_cp=E1_U0_S0_model.th", sd, "E1_U0_S0")
        loaded[mode] = torch.load(provider.checkpoint_path / "net_cp=E1_U0_S0_model.th", weights_only=True)
    assert_bitwise_equal(loaded["async"]["state_dict"], loaded["sync"]["state_dict"])
