"""Language-modelling data from local text: ``text_file`` (any file or folder) and ``python_stdlib``.

Both read text as one stream of tokens, bytes (vocabulary 256) or characters (vocabulary: the
characters that occur, in code-point order), and cut it into samples of ``seq_len + 1``
consecutive tokens without overlap: the input is the first ``seq_len`` tokens and the target the
same window shifted by one, so each sample is a next-token prediction task over ``seq_len``
positions (``DataSplits.task == "sequence"``). The split is by position: the first
``1 - test_fraction`` of the stream trains, the rest tests, so no test text is ever trained on
(a shuffled split of overlapping text would leak it).

``python_stdlib`` is the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``,
its top-level ``*.py`` files in name order): a corpus every machine with Python has, offline. It
differs a little between Python versions, so the run's description names the version and size.
Nothing is downloaded, nothing is executed: files are read as bytes.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Literal

import torch

from dbx.errors import UserError
from dbx.protocols import DataSplits

__all__ = ["text_file", "python_stdlib", "read_corpus", "tokenize"]

Level = Literal["byte", "char"]


def text_file(
    *,
    path: str | None = None,
    pattern: str = "*.txt",
    level: Level = "byte",
    seq_len: int = 128,
    test_fraction: float = 0.1,
    max_bytes: int | None = None,
    root: str = "",
) -> DataSplits:
    """Next-token prediction over a local text file, or over the files of a folder.

    ``path`` is a file or a folder; a relative path is taken under the data root (``root``,
    injected by dbx), and null means the data root itself. A folder contributes its files that
    match ``pattern`` (glob, ``**`` for subfolders, e.g. ``"**/*.md"``), in path order. ``level``:
    ``byte`` (vocabulary 256, any file) or ``char`` (UTF-8 text; vocabulary: the characters found).
    ``max_bytes`` keeps only the first that many bytes of the concatenated files (null: all).
    """
    location = _resolve(path, root)
    files = _files(location, pattern)
    return _splits(files, level=level, seq_len=seq_len, test_fraction=test_fraction, max_bytes=max_bytes,
                   name=f"text {location}")


#: Folders under the standard library's that are not the library: installed packages, and tests.
NOT_THE_LIBRARY = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def python_stdlib(
    *,
    level: Level = "byte",
    seq_len: int = 128,
    test_fraction: float = 0.1,
    max_bytes: int | None = 2_000_000,
    subfolders: bool = False,
) -> DataSplits:
    """Next-token prediction over the Python standard library's ``*.py`` sources.

    The same samples as ``text_file`` (see the module docstring) over a corpus that needs no
    download. By default the top-level modules (CPython 3.11: 168 files, 4.7 MB), of which
    ``max_bytes`` (default 2 MB) keeps the first, for short CPU runs; ``subfolders: true`` adds the
    packages (``email/``, ``json/``, ...; 3.11: about 800 files, 12.6 MB), never installed
    third-party packages or test suites.
    """
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = _files(folder, "**/*.py" if subfolders else "*.py")
    files = [f for f in files if not NOT_THE_LIBRARY & set(f.relative_to(folder).parts[:-1])]
    version = ".".join(map(str, sys.version_info[:3]))
    return _splits(files, level=level, seq_len=seq_len, test_fraction=test_fraction, max_bytes=max_bytes,
                   name=f"Python {version} standard library sources")


def read_corpus(files: list[Path], max_bytes: int | None = None) -> bytes:
    """The files' bytes one after the other (each followed by a newline), cut at ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc.strerror or exc}") from exc
        chunks.append(data if data.endswith(b"\n") else data + b"\n")
        size += len(chunks[-1])
        if max_bytes is not None and size >= max_bytes:
            break
    corpus = b"".join(chunks)
    return corpus[:max_bytes] if max_bytes is not None else corpus


def tokenize(corpus: bytes, level: Level) -> tuple[torch.Tensor, int, str]:
    """Token ids (int64), the vocabulary size, and a word for the unit."""
    if level == "byte":
        return torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long(), 256, "bytes"
    import numpy as np

    points = np.frombuffer(corpus.decode("utf-8", errors="replace").encode("utf-32-le"), dtype="<u4")
    alphabet, ids = np.unique(points, return_inverse=True)  # code-point order
    return torch.from_numpy(ids.astype(np.int64)), max(len(alphabet), 2), "characters"


def _splits(files: list[Path], *, level: str, seq_len: int, test_fraction: float, max_bytes: int | None,
            name: str) -> DataSplits:
    if level not in ("byte", "char"):
        raise UserError(f"level must be 'byte' or 'char', got {level!r}")
    if seq_len < 1:
        raise UserError(f"seq_len must be at least 1, got {seq_len}")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if max_bytes is not None and max_bytes < 1:
        raise UserError(f"max_bytes must be a positive number of bytes or null, got {max_bytes}")
    tokens, vocab, unit = tokenize(read_corpus(files, max_bytes), level)  # type: ignore[arg-type]
    window = seq_len + 1
    cut = round(len(tokens) * (1.0 - test_fraction))
    train, test = _windows(tokens[:cut], window), _windows(tokens[cut:], window)
    if len(train) == 0 or len(test) == 0:
        need = int(window / min(test_fraction, 1 - test_fraction)) + 1
        raise UserError(f"{name}: {len(tokens)} {unit} give {len(train)} training and {len(test)} test sequences "
                        f"of {window} tokens; use a shorter seq_len, or at least {need} {unit} of text")
    return DataSplits(
        train=(train[:, :-1].contiguous(), train[:, 1:].contiguous()),
        test=(test[:, :-1].contiguous(), test[:, 1:].contiguous()),
        num_classes=vocab,
        input_shape=(seq_len,),
        description=f"{name}: {len(tokens):,} {unit}, {level}-level (vocabulary {vocab}), "
                    f"{len(train)} + {len(test)} sequences of {seq_len}",
        task="sequence",
    )


def _windows(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping windows of ``window`` tokens, ``(count, window)``; the remainder is dropped."""
    count = len(tokens) // window
    return tokens[: count * window].view(count, window)


def _resolve(path: str | None, root: str) -> Path:
    if path in (None, ""):
        return Path(root or ".")
    expanded = Path(os.path.expanduser(os.path.expandvars(str(path))))
    return expanded if expanded.is_absolute() or not root else Path(root) / expanded


def _files(location: Path, pattern: str) -> list[Path]:
    if location.is_file():
        return [location]
    if not location.is_dir():
        raise UserError(f"no text file or folder at {location}; set data.params.path to a file or folder "
                        f"(a relative path is taken under the data root)")
    files = sorted(p for p in location.glob(pattern) if p.is_file())
    if not files:
        raise UserError(f"no files matching {pattern!r} in {location}; set data.params.pattern (e.g. '**/*.md') "
                        f"or data.params.path to a file")
    return files
