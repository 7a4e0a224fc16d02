"""Fixtures shared by the test files."""
import pytest

from dbx import registry


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path to install small distributions into (see distributions.py); the
    registry rescans before and after. The current folder is the empty tmp_path."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.refresh()
    yield folder
    registry.refresh()
