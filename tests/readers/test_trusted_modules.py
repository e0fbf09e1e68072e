"""`load_model` imports no module because a file names it: classes come from modules already
imported, or from modules the caller trusts; a `__main__` module is never imported."""

from __future__ import annotations

import sys
import types
import uuid

import pytest
import torch
from pydantic import model_validator

from ksuit.readers import load_model
from ksuit.schemas.models import ModelBaseConfig

LINEAR_SD = {"lin.weight": torch.arange(4.0).reshape(2, 2), "lin.bias": torch.tensor([5.0, 6.0])}

GOOD_MODELS = """
from torch import nn

from ksuit.models import Model
from ksuit.schemas.models import ModelBaseConfig


class NetConfig(ModelBaseConfig):
    kind: str = "{pkg}.models.Net"
    name: str = "net"


class Net(Model):
    def __init__(self, model_config: NetConfig, **kwargs):
        super().__init__(model_config, **kwargs)
        self.lin = nn.Linear(2, 2)
"""

EVIL = """
import pathlib

pathlib.Path({marker!r}).write_text("imported")

from ksuit.schemas.models import ModelBaseConfig


class Cfg(ModelBaseConfig):
    pass
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path (as the current directory is) for modules made by a test; every
    module imported from it is forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        del sys.modules[name]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def weights_file(path, config_kind, kind, state_dict=LINEAR_SD):
    torch.save(
        {"state_dict": state_dict, "model_config": {"kind": kind, "name": "net"}, "config_kind": config_kind},
        path,
    )
    return path


def test_a_module_beside_the_checkpoint_named_by_config_kind_is_not_imported(site, tmp_path):
    helpers = unique("helpers")
    marker = tmp_path / "ran"
    (site / f"{helpers}.py").write_text(EVIL.format(marker=str(marker)))
    path = weights_file(tmp_path / "net_cp=E1_model.th", f"{helpers}.Cfg", f"{helpers}.Net")
    with pytest.raises(ImportError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and f"'{helpers}.Cfg'" in message
    assert f"import {helpers} first, or pass trusted_modules=['{helpers}']" in message
    assert not marker.exists() and helpers not in sys.modules


def test_a_model_kind_named_by_the_file_is_not_imported(site, tmp_path):
    helpers = unique("helpers")
    marker = tmp_path / "ran"
    (site / f"{helpers}.py").write_text(EVIL.format(marker=str(marker)))
    path = weights_file(tmp_path / "w.th", "ksuit.zoo.autoencoder.EncoderConfig", f"{helpers}.Net")
    with pytest.raises(ImportError, match=rf"model class \(model_config.kind\) '{helpers}.Net'"):
        load_model(path)
    assert not marker.exists() and helpers not in sys.modules


def test_a_main_module_is_never_imported_even_under_a_trusted_package(site, tmp_path):
    pkg = unique("tool")
    marker = tmp_path / "ran"
    (site / pkg).mkdir()
    (site / pkg / "__init__.py").write_text("")
    (site / pkg / "__main__.py").write_text(EVIL.format(marker=str(marker)))
    path = weights_file(tmp_path / "w.th", f"{pkg}.__main__.Cfg", f"{pkg}.__main__.Net")
    with pytest.raises(ImportError, match="a __main__ module is never imported"):
        load_model(path)
    with pytest.raises(ImportError, match="a __main__ module is never imported"):
        load_model(path, trusted_modules=[pkg])
    with pytest.raises(ValueError, match="never imported"):
        load_model(path, trusted_modules=[f"{pkg}.__main__"])
    assert not marker.exists() and f"{pkg}.__main__" not in sys.modules


def test_trusted_modules_allow_a_package_and_its_submodules_on_dot_boundaries(site, tmp_path):
    pkg = unique("mypkg")
    (site / pkg).mkdir()
    (site / pkg / "__init__.py").write_text("")
    (site / pkg / "models.py").write_text(GOOD_MODELS.format(pkg=pkg))
    path = weights_file(tmp_path / "net_cp=E1_model.th", f"{pkg}.models.NetConfig", f"{pkg}.models.Net")
    with pytest.raises(ImportError, match=rf"pass trusted_modules=\['{pkg}'\]"):
        load_model(path)
    prefix = pkg.split("_")[0]  # 'mypkg' is a string prefix of 'mypkg_1234abcd', not a parent module
    with pytest.raises(ImportError, match="is in a module that is not imported"):
        load_model(path, trusted_modules=[prefix])
    assert f"{pkg}.models" not in sys.modules
    model = load_model(path, trusted_modules=[f"{pkg}.models"])
    assert type(model).__module__ == f"{pkg}.models" and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in LINEAR_SD.items())
    # once the caller has imported the module, its classes need no trust
    assert torch.equal(load_model(path).lin.bias, LINEAR_SD["lin.bias"])


def test_trusted_module_matching():
    from ksuit.utils.imports import is_trusted_module, trusted_prefixes

    prefixes = trusted_prefixes(["mypkg", "other.models"])
    assert is_trusted_module("mypkg", prefixes) and is_trusted_module("mypkg.models.deep", prefixes)
    assert is_trusted_module("other.models.x", prefixes)
    assert not is_trusted_module("mypkg2", prefixes) and not is_trusted_module("other", prefixes)
    assert not is_trusted_module("mypkg.__main__", prefixes)
    assert trusted_prefixes("mypkg") == ("mypkg",)  # one name, not its letters
    for bad in ["", "my pkg", "a..b", 3]:
        with pytest.raises(ValueError, match="is not a module name"):
            trusted_prefixes([bad])


BUILT: list[str] = []


class RecordingConfig(ModelBaseConfig):
    """A config that records being built (imported: the test module is loaded)."""

    @model_validator(mode="before")
    @classmethod
    def _record(cls, data):
        BUILT.append("config")
        return data


def test_classes_are_checked_before_anything_is_built(tmp_path):
    BUILT.clear()
    path = weights_file(tmp_path / "w.th", f"{__name__}.RecordingConfig", "torch.nn.Linear")
    with pytest.raises(TypeError, match=r"'torch.nn.Linear' is not a ModelBase subclass"):
        load_model(path)
    assert BUILT == []  # the config was not validated before the model class was known to be fine


def test_a_function_named_as_a_class_is_refused_and_not_called(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("os.system", lambda *a: calls.append(a))
    path = weights_file(tmp_path / "w.th", "os.system", "os.system")
    with pytest.raises(TypeError, match="'os.system' is not a ModelBaseConfig subclass"):
        load_model(path)
    assert calls == []


def test_no_module_getattr_runs_for_a_name_a_file_gives(tmp_path, monkeypatch):
    looked_up = []
    lazy = types.ModuleType("lazy_mod_for_test")

    def module_getattr(name):
        looked_up.append(name)  # a lazy module would import a submodule here
        raise AttributeError(name)

    lazy.__getattr__ = module_getattr
    monkeypatch.setitem(sys.modules, "lazy_mod_for_test", lazy)
    path = weights_file(tmp_path / "w.th", "lazy_mod_for_test.Config", "lazy_mod_for_test.Net")
    with pytest.raises(ImportError, match="lazy_mod_for_test.Config"):
        load_model(path)
    assert looked_up == []


@pytest.mark.parametrize("kind", ["os.system; rm -rf", "x" * 2000 + ".A", ".leading.dot", 42])
def test_names_that_are_no_import_path_are_refused(tmp_path, kind):
    path = weights_file(tmp_path / "w.th", kind, "ksuit.zoo.autoencoder.Encoder")
    with pytest.raises(ValueError, match="is not an import path"):
        load_model(path)
