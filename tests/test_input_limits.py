"""Inputs that used to hang, train forever or fail mid-run are input errors found before any run:
a YAML alias bomb nested inside plugin params, counts with twenty digits, MNIST files whose
labels are out of range or whose images and labels disagree in number, a Tiny-ImageNet annotation
that points outside its folder. Each answers with exit 2, a line or two, and creates nothing."""
import gzip
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from test_data_images import write_idx, write_mnist, write_tiny_imagenet

from dbx.cli import main
from dbx.data.mnist import mnist
from dbx.data.tiny_imagenet import tiny_imagenet
from dbx.errors import UserError

SPEC = """\
name: limits
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 4}}
model: {name: logreg}
optimizer: {lr: 0.1}
epochs: 2
policy: {name: fixed}
tracking: {system_metrics: false}
"""

# Nine levels of nine aliases inside one plugin parameter: 9**9 = 387 million values expanded.
BOMB_MODEL = """\
model:
  name: mlp
  params:
    widths: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a],
             &c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c],
             &e [*d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e],
             &g [*f, *f, *f, *f, *f, *f, *f, *f, *f], &h [*g, *g, *g, *g, *g, *g, *g, *g, *g],
             &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]]
"""


def spec_with(tmp_path, old, new):
    assert old in SPEC
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace(old, new))
    return path


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_alias_bomb_inside_model_params_is_refused_at_once(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = spec_with(tmp_path, "model: {name: logreg}\n", BOMB_MODEL)
    result = invoke(command, str(spec))  # before the limit, this never returned (2.3 GB after 30 s)
    assert result.exit_code == 2, result.output
    assert "spec.yaml:9: model.params.widths.5: YAML aliases expand this value to more than 100,000 values" \
        in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_the_reader_never_expands_what_it_refused():
    from dbx.spec import SpecError, parse_spec

    with pytest.raises(SpecError) as info:
        parse_spec(SPEC.replace("model: {name: logreg}\n", BOMB_MODEL))
    widths = info.value.data["model"]["params"]["widths"]
    assert widths[5] is None and widths[8] == [[[None] * 9] * 9] * 9  # the refused level, and all above it


def test_aliases_that_stay_small_are_still_fine(tmp_path):
    spec = spec_with(tmp_path, "model: {name: logreg}\n",
                     "model: {name: mlp, params: {widths: &w [8, 8]}}\nsweep: {model.params.widths: [*w, [4]]}\n")
    result = invoke("validate", str(spec))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("old, new, message", [
    ("epochs: 2", "epochs: 99999999999999999999999999", "epochs: must be <= 1000000, got 99999999999999999999999999"),
    ("name: limits", "name: limits\nseed: 99999999999999999999", "seed: must be <= 4294967295"),
    ("epochs: 2", "epochs: 2\neval_batch_size: 10000000000000", "eval_batch_size: must be <= 2147483647"),
    ("epochs: 2", "epochs: 2\ncheckpoint: {keep_last: 99999999999999999999}", "checkpoint.keep_last: must be <= 2147483647"),
], ids=["epochs", "seed", "eval_batch_size", "keep_last"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_count_with_twenty_digits_is_an_input_error(tmp_path, monkeypatch, command, old, new, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = spec_with(tmp_path, old, new)
    result = invoke(command, str(spec))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


# ------------------------------------------------------------------------------------- MNIST


def raw_folder(tmp_path):
    write_mnist(tmp_path)
    return tmp_path / "MNIST" / "raw"


@pytest.mark.parametrize("damage, message", [
    (lambda raw: write_idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 5, 6, 10, 8, 9, 0, 1])),
     "train-labels-idx1-ubyte: label 10 (sample 7) is outside 0..9 (1 such labels)"),
    (lambda raw: write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(4) % 10),
     "t10k-images-idx3-ubyte holds 5 images but {raw}/t10k-labels-idx1-ubyte holds 4 labels"),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-100]),
     "its header says 12 x 28 x 28 = 9,408 bytes of images, but it holds 9,308; the file is cut short"),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(gzip.compress((raw / "train-images-idx3-ubyte").read_bytes())),
     "is not an uncompressed IDX file of unsigned bytes"),
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-labels-idx1-ubyte").read_bytes()),
     "has 1 dimensions; an MNIST images file has 3: are the file names swapped?"),
], ids=["label-out-of-range", "fewer-labels-than-images", "cut-short", "still-gzipped", "swapped"])
def test_bad_mnist_files_are_input_errors_that_name_the_file(tmp_path, damage, message):
    raw = raw_folder(tmp_path)
    damage(raw)
    with pytest.raises(UserError) as info:
        mnist(root=str(tmp_path))
    assert message.format(raw=raw) in str(info.value)


def test_dbx_run_on_mnist_with_a_bad_label_exits_2_before_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = raw_folder(tmp_path / "data")
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 4, 11, 6, 7]))
    spec = spec_with(tmp_path, "{name: synthetic_logistic, params: {n: 200, d: 4}}",
                     f"{{name: mnist, root: {tmp_path / 'data'}}}")
    result = invoke("run", str(spec))
    assert result.exit_code == 2, result.output
    assert "t10k-labels-idx1-ubyte: label 11 (sample 2) is outside 0..9" in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "spec.yaml"]


def test_good_mnist_files_still_read(tmp_path):
    train = write_mnist(tmp_path)
    splits = mnist(root=str(tmp_path), device_resident=False)
    assert np.array_equal(splits.train.images[..., 0], train)
    assert splits.train.labels == [i % 10 for i in range(12)]


# ------------------------------------------------------------------------------ Tiny-ImageNet


def test_a_tiny_imagenet_annotation_that_leads_outside_its_folder_is_refused(tmp_path):
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[1] = lines[1].replace("val_1.JPEG", "../../../../etc/passwd")
    annotations.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as info:
        tiny_imagenet(root=str(tmp_path), native=True)
    assert textwrap.shorten(str(info.value), 200).startswith(f"{annotations}:2: image '../../../../etc/passwd' is not a file")
