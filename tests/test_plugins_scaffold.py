"""`dbx plugins new KIND NAME` for each of the four kinds: the generated package installs with pip,
passes its own tests at once, and its example spec trains into MLflow: the five-minute path of
docs/plugins.md."""
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


# kind -> the module the package holds, the entry point's target, how many tests it ships
KINDS = {
    "policy": ("policy", "Myplugin", 5),
    "estimator": ("estimator", "Myplugin", 5),
    "model": ("model", "myplugin", 7),
    "dataset": ("dataset", "myplugin", 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_new_package_installs_passes_its_own_tests_and_runs_its_example(tmp_path, monkeypatch, kind):
    module, target, tests_shipped = KINDS[kind]
    result = CliRunner().invoke(main, ["plugins", "new", kind, "myplugin", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "dbx-myplugin"
    assert f"created {folder}" in result.output and f"pip install -e {folder}" in result.output
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "dbx_myplugin/__init__.py", f"dbx_myplugin/{module}.py", "example.yaml",
                     "pyproject.toml", "setup.cfg", f"tests/test_myplugin_{kind}.py"]
    group = registry.GROUPS[kind]
    assert f"{group} =\n    myplugin = dbx_myplugin.{module}:{target}" in (folder / "setup.cfg").read_text()
    assert "${" not in "".join((folder / f).read_text() for f in files), "a placeholder was left unfilled"

    pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall", str(folder))
    try:
        importlib.invalidate_caches()
        registry.refresh()
        assert registry.info(kind, "myplugin").distribution == "dbx-myplugin"

        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder,
                               capture_output=True, text=True)
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert f"{tests_shipped} passed" in tests.stdout

        # the example spec, shortened, trains into MLflow with the new plugin
        monkeypatch.chdir(tmp_path)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run = CliRunner().invoke(main, ["run", str(folder / "example.yaml"), "--tracking-uri", uri,
                                        "--set", "epochs=2", "--set", "data.params.n=600",
                                        "--set", "tracking.system_metrics=false"])
        assert run.exit_code == 0, run.output
        assert "warning" not in run.output.lower()  # its signature is a schema dbx can check
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        [recorded] = client.search_runs([client.get_experiment_by_name("myplugin-example").experiment_id])
        assert recorded.data.tags[f"dbx.plugin.{kind}"] == "myplugin (dbx-myplugin 0.1.0)"
        assert recorded.info.status == "FINISHED"
    finally:
        pip("uninstall", "--quiet", "--yes", "dbx-myplugin")
        for name in [m for m in sys.modules if m.split(".")[0] == "dbx_myplugin"]:
            del sys.modules[name]
        importlib.invalidate_caches()
        registry.refresh()


def test_names_derive_from_the_plugin_name():
    names = package_names("my_rule")
    assert {k: names[k] for k in ("name", "dist", "module", "class_name", "target", "group")} == {
        "name": "my_rule", "dist": "dbx-my-rule", "module": "dbx_my_rule", "class_name": "MyRule", "target": "MyRule",
        "group": "dbx.policies"}
    assert package_names("my_net", "model")["target"] == "my_net"  # models and datasets are factory functions


@pytest.mark.parametrize("kind, name, message", [
    ("policy", "My-Rule", "must be lowercase letters, digits and underscores"),
    ("policy", "class", "must be lowercase letters"),
    ("policy", "divebatch", "already registered by dbx"),
    ("estimator", "exact", "already registered by dbx"),
    ("model", "mlp", "already registered by dbx"),
    ("dataset", "mnist", "already registered by dbx"),
])
def test_a_bad_or_taken_name_is_an_input_error(tmp_path, kind, name, message):
    result = CliRunner().invoke(main, ["plugins", "new", kind, name, "--dir", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output
    assert not any(tmp_path.iterdir())


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "dbx-myrule").mkdir()
    result = CliRunner().invoke(main, ["plugins", "new", "policy", "myrule", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output
