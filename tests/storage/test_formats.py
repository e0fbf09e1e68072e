"""Formats: the direct torch zip writer and the safetensors writer produce files that the
reference readers (torch.load, safetensors) read back bit for bit."""

import json
import os
import subprocess
import sys
import threading
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as st_load_file

from ksuit.storage.formats import FORMATS, SafetensorsFormat, TorchFormat, get_format
from ksuit.storage.loading import load_file, read_metadata
from ksuit.storage.local.files import HashingSink
from ksuit.storage.local.safe_files import hash_regular_file as hash_file


def _payload():
    base = torch.arange(100, dtype=torch.float32)
    return {
        "state_dict": OrderedDict(
            base=base,
            view=base[10:20],  # a view into the same storage: aliasing must survive
            transposed=torch.randn(4, 5).t(),  # non-contiguous
            scalar=torch.tensor(3.5),
            empty=torch.zeros(0, 3),
            i64=torch.arange(7),
            bf16=torch.randn(9).to(torch.bfloat16),
            f16=torch.randn(3, 3).half(),
            boolean=torch.tensor([True, False, True]),
            param=torch.nn.Parameter(torch.randn(2, 3)),
        ),
        "checkpoint_tag": "E1_U2_S3",
        "training_iteration": {"epoch": 1, "update": 2, "sample": 3},
        "misc": [1, 2.5, None, "x", (1, 2), {"nested": True}],
        "optim": {
            "state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(3)}},
            "param_groups": [{"lr": 0.1}],
        },
    }


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a, b, path="payload"):
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(_bits(a), _bits(b)), path
    elif isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _write(fmt, payload, path):
    sink = HashingSink(path)
    fmt.write(payload, sink)
    sink.fsync_and_close()
    return sink


@pytest.mark.parametrize("mmap", [False, True])
def test_direct_torch_files_load_with_plain_torch_load(tmp_path, mmap):
    payload = _payload()
    path = tmp_path / "x.th"
    sink = _write(TorchFormat(), payload, path)
    assert hash_file(path) == (sink.nbytes, sink.hexdigest())  # the checksum covers every byte
    out = torch.load(path, weights_only=True, mmap=mmap)
    _assert_same(out, payload)
    sd = out["state_dict"]
    assert isinstance(sd, OrderedDict) and list(sd) == list(payload["state_dict"])
    assert sd["view"].untyped_storage().data_ptr() == sd["base"].untyped_storage().data_ptr()
    assert sd["transposed"].stride() == payload["state_dict"]["transposed"].stride()
    assert isinstance(sd["param"], torch.nn.Parameter)


def test_torch_files_are_written_without_crc_and_leave_the_option_as_it_was(tmp_path):
    # CRC-32 off is what makes torch.save fast (the manifest's xxh3 covers the file); torch keeps
    # the option process-wide, so ksuit must put it back, also when saves run in several threads
    assert torch.serialization.get_crc32_options() is True
    paths = [tmp_path / f"x{i}.th" for i in range(4)]
    payloads = [_payload() for _ in paths]
    threads = [
        threading.Thread(target=_write, args=(TorchFormat(), x, p))
        for x, p in zip(payloads, paths, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.serialization.get_crc32_options() is True
    with zipfile.ZipFile(paths[0]) as z:
        data = [i for i in z.infolist() if i.filename.startswith("archive/data/")]
        assert data and all(i.CRC == 0 for i in data)
    for x, p in zip(payloads, paths, strict=True):
        _assert_same(torch.load(p, weights_only=True), x)


def test_one_memory_seen_as_two_dtypes_is_refused(tmp_path):
    t = torch.zeros(4)
    with pytest.raises(RuntimeError, match="different types"):
        _write(TorchFormat(), {"a": t, "b": t.view(torch.int32)}, tmp_path / "bad.th")


def test_direct_file_loads_in_a_process_without_ksuit(tmp_path):
    path = tmp_path / "plain.th"
    _write(TorchFormat(), {"state_dict": {"w": torch.arange(12.0).view(3, 4)}, "tag": "E1"}, path)
    # -I -S: no site processing, so the editable install of ksuit is not on the path; only the
    # folder holding torch is added back
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    code = f"""
import sys
sys.path.append({torch_dir!r})
try:
    import ksuit
except ImportError:
    pass
else:
    raise SystemExit("ksuit is importable; the test would prove nothing")
import torch
p = torch.load({str(path)!r}, weights_only=True, mmap=True)
assert torch.equal(p["state_dict"]["w"], torch.arange(12.0).view(3, 4)) and p["tag"] == "E1"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ---- safetensors ---------------------------------------------------------------------------


def _weights_payload():
    base = torch.randn(6, 4)
    return {
        "state_dict": {
            "w": base,
            "w_alias": base,  # shared tensor (tied weights)
            "w_view": base[2:4],  # a view at an offset
            "wt": base.t(),  # non-contiguous
            "bf": torch.randn(5).to(torch.bfloat16),
            "i": torch.arange(3, dtype=torch.int32),
            "b": torch.tensor([True, False]),
            "s": torch.tensor(2.0),
            "e": torch.zeros(0),
        },
        "checkpoint_tag": "latest",
        "training_iteration": {"epoch": 2, "update": 40, "sample": 160},
        "run_id": "run1",
        "model_config": {"kind": "x.Y", "name": "enc", "hidden": [1, 2]},
    }


def test_safetensors_file_reads_with_safetensors_and_ksuit(tmp_path):
    payload = _weights_payload()
    path = tmp_path / "m.safetensors"
    _write(SafetensorsFormat(), payload, path)
    ref = st_load_file(str(path))
    for key, value in payload["state_dict"].items():
        assert ref[key].dtype == value.dtype and torch.equal(ref[key], value), key
        assert ref[key].is_contiguous()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_config"]) == payload["model_config"]
    loaded = load_file(path)
    _assert_same(loaded, payload)
    meta = read_metadata(path)
    assert meta["training_iteration"] == payload["training_iteration"]
    assert meta["state_dict"]["wt"] == {"shape": [4, 6], "dtype": "F32", "nbytes": 96}


def test_safetensors_rejects_what_it_cannot_hold(tmp_path):
    fmt = get_format("safetensors")
    with pytest.raises(TypeError, match="format='torch'"):
        _write(
            fmt,
            {"state_dict": {"w": torch.ones(2)}, "extra_tensor": torch.ones(1)},
            tmp_path / "a.safetensors",
        )
    with pytest.raises(TypeError, match="format='torch'"):
        _write(fmt, {"state_dict": {"w": [1, 2]}}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="known: torch, safetensors"):
        get_format("npz")
    assert set(FORMATS) == {"torch", "safetensors"}


def test_read_metadata_of_torch_file_reads_no_tensor_bytes(tmp_path):
    path = tmp_path / "big.th"
    _write(TorchFormat(), {"state_dict": {"w": torch.ones(1 << 20)}, "tag": "E1"}, path)
    meta = read_metadata(path)
    assert meta == {
        "state_dict": {"w": {"shape": [1 << 20], "dtype": "float32", "nbytes": 4 << 20}},
        "tag": "E1",
    }


# ---- every reader reads both formats ---------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_safetensors_weights_are_read_by_every_reader(path_provider, update_counter, async_save):
    from ksuit.readers import list_checkpoints, load_model, scan_sets, select_resume_set
    from ksuit.writers import CheckpointWriter
    from ksuit.zoo.autoencoder import Autoencoder
    from tests.conftest import FakeTrainer, autoencoder_config, train_one_step

    model = Autoencoder(autoencoder_config()).initialize()
    train_one_step(model)
    update_counter.next_epoch()
    with CheckpointWriter(path_provider, update_counter, format="safetensors", async_save=async_save) as w:
        w.save(model, "E1_U0_S0", trainer=FakeTrainer(update_counter), save_latest_weights=True)
    run_dir = path_provider.run_output_path
    infos = {(c.model_name, c.tag, c.kind): c for c in list_checkpoints(run_dir)}
    enc = infos[("autoencoder.encoder", "latest", "model")]
    assert enc.format == "safetensors" and enc.path.suffix == ".safetensors"
    assert enc.training_iteration is not None and enc.training_iteration.epoch == 1
    assert infos[("autoencoder.encoder", "E1_U0_S0", "optim")].format == "torch"
    meta = read_metadata(enc.path)
    assert meta["checkpoint_tag"] == "latest" and meta["run_id"] == "run1"
    assert meta["model_config"]["kind"].endswith("Encoder")
    rebuilt = load_model(enc.path)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    assert all(s.ok for s in scan_sets(run_dir, checksum=True))
    chosen, _ = select_resume_set(run_dir, "autoencoder", required=[("autoencoder.encoder", "model")])
    assert chosen.tag in {"E1_U0_S0", "latest"} and chosen.training_iteration.epoch == 1
    assert chosen.file("autoencoder.encoder", "model").format == "safetensors"


def test_listing_1000_checkpoints_opens_no_checkpoint_file(tmp_path, monkeypatch):
    from ksuit.layout import checkpoint_filename
    from ksuit.readers import list_checkpoints

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    big = folder / "src.th"
    _write(TorchFormat(), {"state_dict": {"w": torch.zeros(256, 1024)}}, big)  # 1 MiB each
    for i in range(1000):
        name = checkpoint_filename("net", f"E{i}_U{i}_S{i}", "model", fmt="torch" if i % 2 else "safetensors")
        os.link(big, folder / name)  # hard links: 1000 real 1 MiB files, no 1 GiB of writes
    os.unlink(big)
    opened = []
    real_open = os.open

    def counting_open(path, flags, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    infos = list_checkpoints(tmp_path / "run")
    monkeypatch.undo()
    assert len(infos) == 1000 and all(i.size_bytes > (1 << 20) for i in infos)
    # sizes and iterations come from the folder listing and names: not one checkpoint is opened
    assert [p for p in opened if p.endswith((".th", ".safetensors"))] == []


# ---- the O_DIRECT path (on by default for large files) ----------------------------------------


@pytest.mark.parametrize("fmt_name", ["torch", "safetensors"])
@pytest.mark.parametrize("head", [0, 100])
def test_direct_io_stream_writes_the_same_bytes_and_checksum(tmp_path, monkeypatch, fmt_name, head):
    from ksuit.storage.local import direct_io

    payload = {
        "state_dict": {f"t{i}": torch.randn(1000 + 37 * i) for i in range(30)},
        "checkpoint_tag": "E1",
    }
    fmt = get_format(fmt_name)

    def write(path, direct):
        monkeypatch.setenv("KSUIT_DIRECT_IO", "1" if direct else "0")
        monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
        monkeypatch.setattr(direct_io, "BOUNCE_BYTES", 3 * direct_io.BLOCK)  # many buffer switches
        sink = HashingSink(path)
        sink.write(b"x" * head)  # a stream that does not start on a block boundary
        with direct_io.open_stream(sink, fmt.estimate_nbytes(payload)) as out:
            fmt.write(payload, out)
        sink.fsync_and_close()
        return sink

    closed = []
    original_close = direct_io.DirectStream.close
    monkeypatch.setattr(direct_io.DirectStream, "close", lambda self: closed.append(original_close(self)))
    direct_sink = write(tmp_path / "direct", True)
    assert closed, "the O_DIRECT stream was not used on this file system"
    write(tmp_path / "plain", False)
    assert len(closed) == 1
    assert hash_file(tmp_path / "direct") == (direct_sink.nbytes, direct_sink.hexdigest())
    direct_bytes, plain_bytes = (tmp_path / "direct").read_bytes(), (tmp_path / "plain").read_bytes()
    assert len(direct_bytes) == len(plain_bytes)
    if fmt_name == "safetensors":
        assert direct_bytes == plain_bytes
    else:
        copy = tmp_path / "direct.th"
        copy.write_bytes(direct_bytes[head:])
        _assert_same(torch.load(copy, weights_only=True, mmap=True), payload)


# ---- load_model: mapped and assigned without a second copy, ties kept ----------------------

from ksuit.models import Model  # noqa: E402
from ksuit.schemas.models import ModelBaseConfig  # noqa: E402


class TiedNetConfig(ModelBaseConfig):
    kind: str = f"{__name__}.TiedNet"
    name: str = "tied"


class TiedNet(Model):
    def __init__(self, model_config, **kwargs):
        super().__init__(model_config, **kwargs)
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_load_model_keeps_values_parameters_and_ties(path_provider, update_counter, fmt):
    from ksuit.readers import load_model
    from ksuit.writers import CheckpointWriter
    from ksuit.zoo.autoencoder import Autoencoder
    from tests.conftest import autoencoder_config

    model = Autoencoder(autoencoder_config()).initialize()
    tied = TiedNet(TiedNetConfig())
    with CheckpointWriter(path_provider, update_counter, format=fmt) as writer:
        writer.save(model, "E1_U0_S0", save_optim=False)
        writer.save_model_checkpoint(
            f"tied_cp=E1_U0_S0_model.{'th' if fmt == 'torch' else fmt}",
            tied.state_dict(),
            "E1_U0_S0",
            model_config=tied.model_config,
        )
    folder = path_provider.checkpoint_path
    ext = "th" if fmt == "torch" else fmt
    encoder = load_model(folder / f"autoencoder.encoder_cp=E1_U0_S0_model.{ext}")
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value)
    params = list(encoder.parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)
    loss = encoder(torch.randn(2, 16)).sum()
    loss.backward()  # a loaded model trains
    with torch.no_grad():
        params[0].add_(1.0)  # and may be changed in place, without touching the file
    assert torch.equal(
        load_model(folder / f"autoencoder.encoder_cp=E1_U0_S0_model.{ext}").state_dict()["net.0.weight"],
        model.encoder.state_dict()["net.0.weight"],
    )
    rebuilt = load_model(folder / f"tied_cp=E1_U0_S0_model.{ext}")
    assert rebuilt.head.weight is rebuilt.embed.weight
    assert torch.equal(rebuilt.embed.weight, tied.embed.weight)
