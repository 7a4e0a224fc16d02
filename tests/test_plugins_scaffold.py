"""`dbx plugins new policy NAME`: the generated package installs with pip, passes its own tests at
once, and its example spec trains into MLflow: the five-minute path of docs/plugins.md."""
import importlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dbx import registry
from dbx.cli import main
from dbx.scaffold import package_names


def pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_new_policy_writes_a_package_that_installs_passes_its_tests_and_runs(tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["plugins", "new", "policy", "myrule", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "dbx-myrule"
    assert f"created {folder}" in result.output and f"pip install -e {folder}" in result.output
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "dbx_myrule/__init__.py", "dbx_myrule/policy.py", "example.yaml",
                     "pyproject.toml", "setup.cfg", "tests/test_myrule_policy.py"]
    assert "myrule = dbx_myrule.policy:Myrule" in (folder / "setup.cfg").read_text()

    pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall", str(folder))
    try:
        importlib.invalidate_caches()
        registry.refresh()
        assert registry.info("policy", "myrule").distribution == "dbx-myrule"

        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder,
                               capture_output=True, text=True)
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert "5 passed" in tests.stdout

        # the example spec, shortened, trains into MLflow with the new policy
        monkeypatch.chdir(tmp_path)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run = CliRunner().invoke(main, ["run", str(folder / "example.yaml"), "--tracking-uri", uri,
                                        "--set", "epochs=2", "--set", "data.params.n=600",
                                        "--set", "tracking.system_metrics=false"])
        assert run.exit_code == 0, run.output
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        [recorded] = client.search_runs([client.get_experiment_by_name("myrule-example").experiment_id])
        assert recorded.data.tags["dbx.plugin.policy"] == "myrule (dbx-myrule 0.1.0)"
        assert recorded.info.status == "FINISHED"
    finally:
        pip("uninstall", "--quiet", "--yes", "dbx-myrule")
        for name in [m for m in sys.modules if m.split(".")[0] == "dbx_myrule"]:
            del sys.modules[name]
        importlib.invalidate_caches()
        registry.refresh()


def test_names_derive_from_the_plugin_name():
    assert package_names("my_rule") | {"dbx_version": "-"} == {
        "name": "my_rule", "dist": "dbx-my-rule", "module": "dbx_my_rule", "class_name": "MyRule", "dbx_version": "-"}


@pytest.mark.parametrize("name, message", [
    ("My-Rule", "must be lowercase letters, digits and underscores"),
    ("class", "must be lowercase letters"),
    ("divebatch", "already registered by dbx"),
])
def test_a_bad_or_taken_name_is_an_input_error(tmp_path, name, message):
    result = CliRunner().invoke(main, ["plugins", "new", "policy", name, "--dir", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output
    assert not any(tmp_path.iterdir())


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "dbx-myrule").mkdir()
    result = CliRunner().invoke(main, ["plugins", "new", "policy", "myrule", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output
