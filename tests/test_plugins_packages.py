"""The example plugin packages under plugins/, installed with pip like any third-party package,
then used by name from a spec that `dbx run` trains into a real MLflow store.

Installing is real (pip into this environment, from a copy of each package's folder so that the
build leaves nothing in the working tree) and undone after the module's tests.
"""
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dbx import registry
from dbx.cli import main

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
PACKAGES = {"dbx-gns": "dbx_gns", "dbx-normtest": "dbx_normtest"}

SPEC = """\
name: {name}
seed: 0
device: cpu
data: {{name: synthetic_logistic, params: {{n: 600, d: 8, noise: 0.1}}}}
model: {{name: logreg}}
optimizer: {{lr: 0.2, momentum: 0.9}}
epochs: 3
policy: {policy}
estimator: {{name: exact}}
tracking: {{system_metrics: false}}
"""


def pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def forget_modules(*prefixes: str) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in prefixes]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """dbx-gns and dbx-normtest pip-installed into this environment; their source copies, by name."""
    sources = tmp_path_factory.mktemp("plugin-sources")
    copies = {name: Path(shutil.copytree(PLUGINS / name, sources / name,
                                         ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")))
              for name in PACKAGES}
    pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall", *map(str, copies.values()))
    importlib.invalidate_caches()
    registry.refresh()
    yield copies
    pip("uninstall", "--quiet", "--yes", *PACKAGES)
    forget_modules(*PACKAGES.values())
    importlib.invalidate_caches()
    registry.refresh()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow sqlite store for the module's runs (creating a store costs seconds)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def run_spec(folder: Path, store: Path, name: str, policy: str):
    """`dbx run` a tiny spec with ``policy``; the output, the MLflow run, and its batch sizes by epoch."""
    spec = folder / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name, policy=policy))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "batch_size"), key=lambda m: m.step)
    return result, run, [int(m.value) for m in history]


def test_dbx_plugins_lists_them_with_their_distribution_and_version(installed):
    result = CliRunner().invoke(main, ["plugins", "--check"])
    assert result.exit_code == 0, result.output
    for name, dist in (("gns", "dbx-gns"), ("normtest", "dbx-normtest")):
        info = registry.info("policy", name)
        assert (info.distribution, info.version) == (dist, "0.1.0")
        assert name in result.output and dist in result.output
    assert "all plugins load" in result.output


def test_a_spec_naming_gns_trains_and_mlflow_shows_the_batch_size_changing(installed, workdir, store):
    result, run, sizes = run_spec(workdir, store, "gns-tiny", "{name: gns, params: {initial: 8, min: 8, max: 256}}")
    assert run.info.status == "FINISHED"
    assert run.data.params["policy.name"] == "gns"
    assert run.data.tags["dbx.plugin.policy"] == "gns (dbx-gns 0.1.0)"
    assert sizes[0] == 8 and len(set(sizes)) >= 2, sizes
    assert all(8 <= size <= 256 for size in sizes)
    assert "batch size" in result.output  # dbx itself announces each change


def test_normtest_reads_the_per_sample_statistics_from_outside_dbx(installed, workdir, store):
    _, run, sizes = run_spec(workdir, store, "normtest-tiny", "{name: normtest, params: {initial: 8, max: 256}}")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dbx.plugin.policy"] == "normtest (dbx-normtest 0.1.0)"
    assert sizes[0] == 8 and len(set(sizes)) >= 2 and sizes == sorted(sizes), sizes


def test_plugin_params_are_checked_against_the_plugin_signature(installed, workdir):
    spec = workdir / "typo.yaml"
    spec.write_text(SPEC.format(name="typo", policy="{name: gns, params: {smothing: 0.5, max: big}}"))
    result = CliRunner().invoke(main, ["validate", str(spec)])
    assert result.exit_code == 2
    assert f"{spec}:8: policy.params.smothing: unknown parameter 'smothing'" in result.output
    assert "Did you mean 'smoothing'?" in result.output
    assert f"{spec}:8: policy.params.max:" in result.output


def test_the_packages_pass_their_own_tests(installed):
    tests = [str(folder / "tests") for folder in installed.values()]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            capture_output=True, text=True, cwd=next(iter(installed.values())).parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_packages_import_nothing_private_from_dbx(package):
    import ast

    for path in (PLUGINS / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dbx":
                assert node.module in ("dbx.protocols", "dbx.errors", "dbx.testing"), f"{path}: {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] != "dbx" or alias.name in ("dbx.protocols", "dbx.errors",
                                                                                  "dbx.testing"), path
