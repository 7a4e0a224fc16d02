"""Language-modelling data from local text (``text_file``) and the Python standard library (``python_stdlib``),
on files the tests write."""
import re
import sysconfig

import pytest
import torch

from dbx.data.text import python_stdlib, text_file
from dbx.errors import UserError
from dbx.testing import check_dataset


def test_a_file_becomes_next_token_windows_split_by_position(tmp_path):
    text = bytes(range(32, 127)) * 3  # 285 bytes, no repeats within 95
    (tmp_path / "a.txt").write_bytes(text)
    splits = text_file(path=str(tmp_path / "a.txt"), seq_len=9, test_fraction=0.2)
    assert splits.task == "sequence" and splits.num_classes == 256 and splits.input_shape == (9,)
    stream = torch.tensor(list(text + b"\n"))
    (x, y), (tx, _) = splits.train, splits.test
    assert x.dtype == torch.long and x.shape == (228 // 10, 9)  # 286 bytes: 229 train, 57 test; windows of 10
    assert torch.equal(x[0], stream[:9]) and torch.equal(y[0], stream[1:10])  # targets are the inputs shifted
    assert torch.equal(x[1], stream[10:19])  # windows do not overlap
    cut = round(len(stream) * 0.8)
    assert torch.equal(tx[0], stream[cut:cut + 9])  # the test split is the tail of the text, unseen in training
    assert x.shape[0] * 10 <= cut


def test_a_folder_is_read_in_path_order_with_a_pattern_and_characters_are_a_vocabulary(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("héllo wörld " * 20)
    (tmp_path / "sub" / "a.md").write_text("abc " * 20)
    (tmp_path / "skip.txt").write_text("zzz " * 200)
    splits = text_file(path=str(tmp_path), pattern="**/*.md", level="char", seq_len=8, root="/elsewhere")
    # characters found: ' ', '\n', a, b, c, d, h, l, o, r, w, é, ö (no z: skip.txt does not match)
    assert splits.num_classes == 13
    first = splits.train[0][0].tolist()
    alphabet = sorted(set("héllo wörld abc\n"))
    assert "".join(alphabet[i] for i in first) == "héllo wö"  # b.md comes before sub/a.md


def test_a_relative_path_is_under_the_data_root_and_check_dataset_agrees(tmp_path):
    (tmp_path / "corpus.txt").write_text("to be or not to be " * 30)
    splits = check_dataset(text_file, root=str(tmp_path), params={"path": "corpus.txt", "seq_len": 16})
    assert splits.train[0].shape[1] == 16


@pytest.mark.parametrize("params, fragment", [
    ({"path": "missing.txt"}, "no text file or folder at"),
    ({"path": "."}, "no files matching '*.txt'"),
    ({"path": "short.txt", "seq_len": 64}, "use a shorter seq_len, or at least"),
    ({"path": "short.txt", "level": "word"}, "level must be 'byte' or 'char'"),
])
def test_bad_text_input_says_what_to_change(tmp_path, params, fragment):
    (tmp_path / "short.txt.bak").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "short.txt").write_text("just a few words")
    root = tmp_path / "sub" if params["path"] == "short.txt" else tmp_path
    with pytest.raises(UserError, match=re.escape(fragment)):
        text_file(root=str(root), **params)


def test_the_python_standard_library_is_a_corpus_every_machine_has():
    splits = python_stdlib(seq_len=32, max_bytes=40_000)
    assert splits.task == "sequence" and splits.num_classes == 256
    stdlib = sysconfig.get_paths()["stdlib"]
    first = sorted(p for p in __import__("pathlib").Path(stdlib).glob("*.py"))[0].read_bytes()
    assert bytes(splits.train[0][0].tolist()) == first[:32]
    assert (len(splits.train[0]) + len(splits.test[0])) * 33 <= 40_000
    assert "standard library" in splits.description
