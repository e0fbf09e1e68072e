"""Lightning and Transformers are optional: importing an integration without its framework is an
error that says what to install; importing `ksuit` never needs either."""

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("integration", "framework", "extra"),
    [("lightning", "lightning", "lightning"), ("transformers", "transformers", "transformers")],
)
def test_an_integration_without_its_framework_says_what_to_install(
    monkeypatch, integration, framework, extra
):
    monkeypatch.setitem(sys.modules, framework, None)  # `import <framework>` now fails, as if not installed
    monkeypatch.delitem(sys.modules, f"ksuit.integrations.{integration}", raising=False)
    with pytest.raises(
        ImportError, match=rf"needs the '{framework}' package.*pip install 'ksuit\[{extra}\]'"
    ):
        importlib.import_module(f"ksuit.integrations.{integration}")


def test_ksuit_imports_no_framework():
    code = (
        "import sys, ksuit, ksuit.integrations, ksuit.integrations.loop; "
        "assert not {'lightning', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
