"""The docs a user learns from stay true: docs/spec.md is what the schema generates today (every
key), `dbx spec` prints a spec that validates once its required keys are filled in, the worked
example of docs/algorithm.md is what the divebatch policy computes, the files it names exist, and
nothing in the project cites a source file a clone does not have."""
import re
import subprocess
from pathlib import Path

import yaml
from click.testing import CliRunner

from dbx.cli import main
from dbx.policies.divebatch import DiveBatch
from dbx.spec import spec_from_dict
from dbx.spec_reference import REGENERATE, markdown_reference, spec_keys, yaml_template
from dbx.testing import diversity_estimate, epoch_state

ROOT = Path(__file__).resolve().parent.parent


def test_docs_spec_md_is_current():
    committed = (ROOT / "docs" / "spec.md").read_text()
    assert committed == markdown_reference(), (
        f"docs/spec.md is out of date with the schema in dbx/spec.py (or a built-in plugin's signature): "
        f"run `{REGENERATE}` and commit the result")


def test_the_reference_lists_every_key_of_the_schema():
    text = markdown_reference()
    paths = [key.path for key in spec_keys()]
    for path in paths:
        assert f"| `{path}` |" in text, path
    for key in ("schedule.warmup_epochs", "eval_batch_size", "data.subset", "checkpoint.dir", "tracking.uri"):
        assert key in paths


def test_dbx_spec_prints_a_spec_that_validates_once_the_required_keys_are_filled_in(tmp_path):
    result = CliRunner().invoke(main, ["spec"])
    assert result.exit_code == 0 and result.output == yaml_template()
    data = yaml.safe_load(result.output)
    data.update(name="mine", epochs=3)
    data["data"]["name"], data["model"]["name"], data["policy"]["name"] = "synthetic_logistic", "logreg", "fixed"
    data["optimizer"]["lr"] = 0.1
    spec = spec_from_dict(data)
    assert spec == spec_from_dict({"name": "mine", "epochs": 3, "data": {"name": "synthetic_logistic"},
                                   "model": {"name": "logreg"}, "policy": {"name": "fixed"}, "optimizer": {"lr": 0.1}})


def test_dbx_spec_writes_the_reference_and_refuses_an_unwritable_path(tmp_path):
    out = tmp_path / "spec.md"
    assert CliRunner().invoke(main, ["spec", "--markdown", "--output", str(out)]).exit_code == 0
    assert out.read_text() == markdown_reference()
    result = CliRunner().invoke(main, ["spec", "--markdown", "--output", str(tmp_path / "missing" / "spec.md")])
    assert result.exit_code == 2 and "cannot write" in result.output and "No such file or directory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.md"]


def test_the_worked_example_of_docs_algorithm_md_is_what_divebatch_computes():
    text = (ROOT / "docs" / "algorithm.md").read_text()
    assert "proposes `0.1 * 50,000 * 0.1 = 500`" in text and "a diversity of `0.001` proposes 5," in text
    rule = DiveBatch(dataset_size=50_000, initial=128, delta=0.1, resize_every=1)
    after = epoch_state(1, 128, dataset_size=50_000)
    assert rule.next_batch_size(after, diversity_estimate(value=0.1, samples=50_000)) == 500
    assert rule.next_batch_size(after, diversity_estimate(value=0.001, samples=50_000)) == 128


def test_every_file_docs_algorithm_md_names_exists():
    text = (ROOT / "docs" / "algorithm.md").read_text()
    named = set(re.findall(r"`((?:dbx|experiments|plugins)/[\w/.]*)`", text))
    assert len(named) >= 8
    assert [path for path in sorted(named) if not (ROOT / path).exists()] == []


def test_nothing_in_the_project_cites_a_file_that_is_not_in_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    citing = sorted(path for path in tracked if (ROOT / path).is_file() and path != "tests/test_docs.py"
                    and "PAPER.md" in (ROOT / path).read_text(errors="replace"))
    assert citing == [], f"these cite PAPER.md, which a clone does not have: point them at docs/algorithm.md: {citing}"
