"""Files dbx did not write in this process run no code: crafted CIFAR batches, checkpoints and
specs are refused with a message that says what was refused, and the marker file their payload
would write never appears.

Each crafted file is what an attacker would put in a shared data or checkpoint folder: a pickle
whose reduce step calls os.system (or eval) to create a marker file.
"""
import hashlib
import io
import os
import pickle
import struct
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dbx.cli import main
from dbx.data.cifar import cifar10, cifar100
from dbx.errors import UserError
from dbx.safe_pickle import UnsafePickle, load_plain
from dbx.train.checkpoint import MAGIC, UnsafeCheckpoint, read_checkpoint, round_trip, save_checkpoint

SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


class RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvaluatesCode:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root, overrides=None, protocol=2):
    """The six batch files of CIFAR-10, 4 images each; ``overrides`` replaces one file's object."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        entry = {"batch_label": name, "labels": [(i + j) % 10 for j in range(4)], "data": images(4, i),
                 "filenames": [f"{name}_{j}.png".encode() for j in range(4)]}
        entry = (overrides or {}).get(name, entry)
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    return folder


def python2_batch(data, labels):
    """A CIFAR batch in the bytes Python 2's cPickle wrote for the official archive (protocol 2,
    ``str`` as BINSTRING, numpy as numpy.core), assembled opcode by opcode."""
    def text(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def number(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    out = b"\x80\x02}(" + text(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + number(0) + b"\x85" + text(b"b") + b"\x87R"
    out += b"(" + number(1) + number(data.shape[0]) + number(data.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + text(b"u1") + number(0) + number(1) + b"\x87R"
    out += b"(" + number(3) + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + number(0) + b"tb"
    out += b"\x89" + text(data.tobytes()) + b"tb"
    out += text(b"labels") + b"](" + b"".join(number(v) for v in labels) + b"e"
    out += text(b"batch_label") + text(b"training batch 1 of 5") + b"u."
    return out


# ------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_cifar_batch_that_calls_os_system_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "pwned"
    write_cifar10(tmp_path, {"data_batch_3": RunsAShellCommand(f"touch {marker}")}, protocol=protocol)
    with pytest.raises(UserError) as info:
        cifar10(root=str(tmp_path))
    assert not marker.exists()
    message = str(info.value)
    assert "refused to read" in message and "data_batch_3" in message and SYSTEM in message
    assert "nothing from it was run" in message


@pytest.mark.parametrize("payload, refused", [
    (EvaluatesCode("open('MARKER', 'w')"), "builtins.eval"),
    ({"data": np.array([RunsAShellCommand("touch MARKER")], dtype=object), "labels": [0]}, "dtype object"),
    ({"data": np.zeros((1, 3072)), "labels": [0]}, "dtype float64"),
    ({"data": images(1), "labels": [0], "extra": {1, RunsAShellCommand("touch MARKER")}}, SYSTEM),
], ids=["eval", "object-array", "float-array", "nested-in-a-set"])
def test_every_other_callable_or_dtype_is_refused_too(tmp_path, monkeypatch, payload, refused):
    monkeypatch.chdir(tmp_path)
    text = pickle.dumps(payload, protocol=4).replace(b"MARKER", str(tmp_path / "pwned").encode())
    with pytest.raises(UnsafePickle, match=refused):
        load_plain(io.BytesIO(text), array_dtypes=(np.uint8,))
    assert not (tmp_path / "pwned").exists()


def test_dbx_run_on_a_crafted_cifar_folder_exits_2_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    marker = tmp_path / "pwned"
    write_cifar10(data, {"test_batch": RunsAShellCommand(f"touch {marker}")})
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: crafted
        device: cpu
        data: {{name: cifar10, root: {data}, params: {{augment: false}}}}
        model: {{name: logreg}}
        optimizer: {{lr: 0.1}}
        epochs: 1
        policy: {{name: fixed, params: {{batch_size: 4}}}}
        tracking: {{system_metrics: false}}
        """))
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert not marker.exists()
    assert "refused to read" in result.output and SYSTEM in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "spec.yaml"]  # no store, no checkpoints


def test_the_official_python2_byte_layout_and_python3_pickles_still_read(tmp_path):
    folder = write_cifar10(tmp_path, protocol=4)
    official = python2_batch(images(4, 99), [9, 8, 7, 6])
    (folder / "data_batch_1").write_bytes(official)
    assert pickle.loads(official, encoding="latin1")["labels"] == [9, 8, 7, 6]  # the assembly is a real pickle
    splits = cifar10(root=str(tmp_path), augment=False, device_resident=False)
    first = splits.train.images[:4]  # NHWC uint8, as read
    assert np.array_equal(first, images(4, 99).reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))
    assert splits.train.labels[:4] == [9, 8, 7, 6]
    for protocol in (2, 5):
        write_cifar10(tmp_path / f"p{protocol}", protocol=protocol)
        assert cifar10(root=str(tmp_path / f"p{protocol}")).train[0].shape == (20, 3, 32, 32)


@pytest.mark.parametrize("change, message", [
    (lambda e: {**e, "labels": e["labels"][:3]}, "4 images but 3 labels"),
    (lambda e: {**e, "labels": [0, 1, 2, 10]}, "label 10 is outside 0..9"),
    (lambda e: {**e, "labels": [0, 1, 2, -1]}, "label -1 is outside 0..9"),
    (lambda e: {**e, "data": e["data"][:, :100]}, "shape (N, 3072), got (4, 100)"),
    (lambda e: ["not", "a", "dict"], "expected a dict with 'data' and 'labels', got list"),
], ids=["short-labels", "label-too-large", "negative-label", "wrong-image-size", "not-a-dict"])
def test_a_cifar_batch_with_wrong_contents_is_an_input_error(tmp_path, change, message):
    entry = {"batch_label": "b", "labels": [0, 1, 2, 3], "data": images(4), "filenames": []}
    write_cifar10(tmp_path, {"data_batch_2": change(entry)})
    with pytest.raises(UserError, match="data_batch_2") as info:
        cifar10(root=str(tmp_path))
    assert message in str(info.value)


def test_cifar100_is_read_the_same_safe_way(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps(RunsAShellCommand(f"touch {marker}")))
    (folder / "test").write_bytes(pickle.dumps({"data": images(2), "fine_labels": [0, 99]}))
    with pytest.raises(UserError, match="refused to read .*train"):
        cifar100(root=str(tmp_path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------ checkpoints


def forge(path, payload_bytes):
    """A checkpoint file with a correct header and checksum around any payload bytes."""
    path.write_bytes(MAGIC + hashlib.sha256(payload_bytes).digest() + payload_bytes)


def test_a_checkpoint_with_a_valid_checksum_whose_payload_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": {}, "spec": RunsAShellCommand(f"touch {marker}")}, buffer)
    forge(tmp_path / "epoch-0001.ckpt", buffer.getvalue())
    with pytest.raises(UnsafeCheckpoint) as info:
        read_checkpoint(tmp_path / "epoch-0001.ckpt")
    assert not marker.exists()
    assert SYSTEM in str(info.value) and "nothing from it was run" in str(info.value)


def test_a_plain_pickle_in_place_of_the_torch_payload_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    forge(tmp_path / "epoch-0001.ckpt", pickle.dumps(RunsAShellCommand(f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafeCheckpoint, match=f"refused to load .*{SYSTEM}"):
        read_checkpoint(tmp_path / "epoch-0001.ckpt")
    assert not marker.exists()


TINY = """\
name: tiny
device: cpu
data: {name: synthetic_logistic, params: {n: 200, d: 4}}
model: {name: logreg}
optimizer: {lr: 0.1}
epochs: 3
policy: {name: divebatch, params: {initial: 8, max: 64, resize_every: 1}}
checkpoint: {keep_last: 5}
tracking: {system_metrics: false}
"""


def finished_run(tmp_path):
    """A real 3-epoch run; returns its store URI, run id and checkpoint folder."""
    from mlflow import MlflowClient

    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["run", str(spec), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return uri, run.info.run_id, tmp_path / "dbx-checkpoints" / run.info.run_id


def test_dbx_resume_on_a_crafted_checkpoint_runs_no_code_and_says_what_it_refused(tmp_path):
    from mlflow import MlflowClient

    uri, run_id, folder = finished_run(tmp_path)
    (folder / "epoch-0003.ckpt").unlink()  # as if the run had been killed in epoch 3
    marker = tmp_path / "pwned"
    payload = read_checkpoint(folder / "epoch-0002.ckpt")
    payload["spec"] = RunsAShellCommand(f"touch {marker}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    forge(folder / "epoch-0002.ckpt", buffer.getvalue())
    before = (folder / "epoch-0002.ckpt").read_bytes()

    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert not marker.exists()
    assert f"refused to load {folder / 'epoch-0002.ckpt'}" in result.output and SYSTEM in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert (folder / "epoch-0002.ckpt").read_bytes() == before  # nothing deleted or rewritten
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"  # the run is untouched


def test_a_checkpoint_with_a_valid_checksum_but_another_payload_is_a_clear_error(tmp_path):
    uri, run_id, folder = finished_run(tmp_path)
    (folder / "epoch-0003.ckpt").unlink()
    (folder / "epoch-0002.ckpt").unlink()
    save_checkpoint(folder, 2, {"epoch": 2, "weights": torch.zeros(3)}, keep_last=5)  # checksum fine, not ours

    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert "epoch-0002.ckpt passes its checksum but is not a checkpoint this dbx can resume" in result.output
    assert "it has no 'spec'" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2
    assert [p.name for p in sorted(folder.iterdir())] == ["epoch-0001.ckpt", "epoch-0002.ckpt"]


def test_a_format_1_checkpoint_written_before_this_change_still_resumes(tmp_path):
    """Format 1 kept numpy's random state as an array and the plugins' state as dicts: it is read
    with an allow-list that builds nothing but a uint32 array."""
    import random

    payload = {"format": 1, "numpy": np.random.get_state(), "python": random.getstate(), "policy": {"b": 8}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    forge(tmp_path / "epoch-0001.ckpt", buffer.getvalue())
    read = read_checkpoint(tmp_path / "epoch-0001.ckpt")
    assert read["numpy"][1].dtype == np.uint32 and np.array_equal(read["numpy"][1], payload["numpy"][1])
    assert read["policy"] == {"b": 8}

    # ...but the allow-list is for uint32 arrays only
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format": 1, "numpy": np.array([RunsAShellCommand(f"touch {marker}")], dtype=object)}, buffer)
    forge(tmp_path / "epoch-0002.ckpt", buffer.getvalue())
    with pytest.raises(UserError):
        read_checkpoint(tmp_path / "epoch-0002.ckpt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ specs


@pytest.mark.parametrize("where", ["epochs: !!python/object/apply:os.system ['touch {marker}']",
                                   "model: {name: logreg, params: {x: !!python/object/apply:os.system ['touch {marker}']}}",
                                   "name: !!python/name:os.system"])
def test_python_tags_in_a_spec_stay_inert(tmp_path, where):
    marker = tmp_path / "pwned"
    spec = tmp_path / "spec.yaml"
    line = where.replace("{marker}", str(marker))
    key = line.split(":")[0]
    lines = [f"{line}" if text.startswith(key + ":") else text for text in TINY.splitlines()]
    spec.write_text("\n".join(lines) + "\n")
    for command in (["validate", str(spec)], ["run", str(spec), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert "unsupported YAML tag" in result.output
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_checkpoint_whose_weights_do_not_fit_its_spec_is_a_clear_error(tmp_path):
    uri, run_id, folder = finished_run(tmp_path)
    (folder / "epoch-0003.ckpt").unlink()
    payload = read_checkpoint(folder / "epoch-0002.ckpt")
    payload["spec"]["model"]["params"] = {"bias": False}  # the saved weights have a bias
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    forge(folder / "epoch-0002.ckpt", buffer.getvalue())
    result = CliRunner().invoke(main, ["resume", run_id, "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert "epoch-0002.ckpt does not fit the run its spec describes (RuntimeError: " in result.output
    assert len(result.output.strip().splitlines()) <= 2


@pytest.mark.parametrize("payload, problem", [
    ({"format": 99}, "its format is 99; this dbx reads formats 1 and 2"),
    ("a string", "it holds a str, not the dict dbx writes"),
    ({"format": 2, "spec": [], "state": {"epoch": 1, "batch_size": 8, "mood": "odd"}, "model": {}, "optimizer": {},
      "train_loader": {}, "rng": {"python": 0}, "policy": {}, "estimator": None},
     "its 'spec' is a list, not a dict; its 'policy' is a dict, not the plugin's state; its run state has keys this "
     "dbx does not know: mood; its random-generator states lack numpy, torch"),
], ids=["format", "not-a-dict", "wrong-parts"])
def test_every_way_a_payload_is_not_a_dbx_checkpoint_is_named(payload, problem):
    from dbx.train.checkpoint import payload_problems

    assert problem in "; ".join(payload_problems(payload))


def test_bytes_with_a_valid_checksum_that_torch_cannot_read_are_foreign_not_damaged(tmp_path):
    from dbx.train.checkpoint import ForeignCheckpoint

    forge(tmp_path / "epoch-0001.ckpt", b"not a torch payload at all")
    with pytest.raises(ForeignCheckpoint, match="passes its checksum but cannot be read as a checkpoint"):
        read_checkpoint(tmp_path / "epoch-0001.ckpt")


def test_random_states_of_both_formats_restore():
    import random

    from dbx.train.checkpoint import restore_rng_states, rng_states

    format_1 = {"python": random.getstate, "numpy": np.random.get_state, "torch": torch.get_rng_state}
    for take in (rng_states, lambda: {key: get() for key, get in format_1.items()}):
        states = take()
        expected = (random.random(), np.random.rand(), torch.rand(1).item())
        restore_rng_states(round_trip(states))
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
