"""Every Python example in docs/your-loop.md and the README runs as it is written.

A page's ```python blocks run in order in one namespace (as a reader pasting them one after the
other would), in an empty folder, so their MLflow stores and outputs land there.
"""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/your-loop.md", "README.md"]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_every_python_example_runs(page, tmp_path, monkeypatch, capsys, fresh_mlflow):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python example"
    monkeypatch.chdir(tmp_path)
    environment = dict(os.environ)
    namespace: dict = {"__name__": "__docs__"}
    try:
        for number, block in enumerate(blocks, 1):
            try:
                exec(compile(block, f"{page} (python example {number})", "exec"), namespace)  # noqa: S102
            except Exception as exc:
                raise AssertionError(f"{page}, python example {number} failed:\n{block}") from exc
    finally:
        os.environ.clear()
        os.environ.update(environment)
    assert "diversity" in capsys.readouterr().out
