"""Text files as training and calibration text (issue #18, defects 11 and 12).

Defect 11: a large --data file is tokenized a batch at a time into a memory-mapped token file in
the cache, so memory does not grow with the file, and a later run reads the file back instead of
tokenizing again; the windows are the ones the whole-text-in-memory definition gives.
Defect 12: a bad byte in a UTF-8 file becomes one U+FFFD (counted, in a warning) instead of the
whole file turning into Latin-1; bytes that are not text are refused in one line naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from squeeze import data
from squeeze.cli import app
from squeeze.data import evaluation_windows, load_documents, text_split, token_windows, training_windows
from squeeze.errors import SqueezeError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


class CountingTokenizer:
    """One id per whitespace-separated word; records the characters of every call."""

    eos_token_id = 0
    sep_token_id = None

    def __init__(self) -> None:
        self.calls: list[int] = []

    def get_vocab(self) -> dict[str, int]:
        return {"<eos>": 0}

    def __call__(self, batch: list[str], add_special_tokens: bool, verbose: bool) -> dict:
        self.calls.append(sum(map(len, batch)))
        return {"input_ids": [[1000 + WORDS.index(w) if w in WORDS else 1 for w in doc.split()] for doc in batch]}


class RecordingProgress:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None, list[int]]] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None):
        advances: list[int] = []
        self.tasks.append((description, total, advances))
        yield lambda n=1, info=None: advances.append(n)

    @contextlib.contextmanager
    def status(self, description: str):
        yield


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_words(path: Path, n_chars: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as out:
        written = 0
        while written < n_chars:
            paragraph = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 150))) + "\n\n"
            out.write(paragraph)
            written += len(paragraph)
    return path


def in_memory_windows(tokenizer, source: str, seq_len: int) -> torch.Tensor:
    """The definition: every calibration document held, in hash order, tokenized at once."""
    return token_windows(tokenizer, data._mixed_order(text_split(source).calibration), seq_len)


# --- defect 11: tokens streamed into a memory-mapped file -------------------------------------


def test_a_large_file_is_tokenized_a_batch_at_a_time_into_a_token_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 1 << 16)
    source = str(write_words(tmp_path / "big.txt", 4_000_000))
    tokenizer, progress = CountingTokenizer(), RecordingProgress()
    windows = training_windows(tokenizer, source, 64, progress=progress)
    # every call saw one batch: the first window was written after ~64 KB of a 4 MB file
    assert len(tokenizer.calls) > 4_000_000 // (1 << 16) // 2
    assert max(tokenizer.calls) <= (1 << 16) + 2 * data.FILE_CHUNK_CHARS
    [(description, total, advances)] = progress.tasks
    assert "big.txt" in description and sum(advances) == total == len(text_split(source).calibration)
    assert len(advances) == len(tokenizer.calls)
    # the same windows as tokenizing everything in memory, read from a file in the cache
    assert torch.equal(windows, in_memory_windows(CountingTokenizer(), source, 64))
    [token_file] = (Path(data.cache_dir()) / "tokens").iterdir()
    assert token_file.stat().st_size >= windows.numel() * 8
    # a later run (a resume) maps the file again without tokenizing
    again = CountingTokenizer()
    assert torch.equal(training_windows(again, source, 64), windows) and again.calls == []


def test_peak_memory_does_not_grow_with_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 1 << 16)
    peaks = {}
    for size in (1_000_000, 4_000_000):
        source = str(write_words(tmp_path / f"text{size}.txt", size, seed=size))
        tracemalloc.start()
        windows = training_windows(CountingTokenizer(), source, 64)
        peaks[size] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert windows.shape[0] > size // 6 // 64 * 0.7  # ~6 characters a token, 80% on the training side
    # holding the documents and their tokens grows by several bytes per character of text
    assert peaks[4_000_000] - peaks[1_000_000] < 0.25 * 3_000_000, peaks


def test_a_real_tokenizer_gives_the_in_memory_windows(minilm_tokenizer, small_text: Path) -> None:
    streamed = training_windows(minilm_tokenizer, str(small_text), 32)
    assert torch.equal(streamed, in_memory_windows(minilm_tokenizer, str(small_text), 32))


def _reference_chunks(text: str, chunk_chars: int) -> list[str]:
    """The paragraph chunks of a whole text, as squeeze cut them before it read files a line at a time."""
    chunks, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.strip():
            current.append(paragraph.strip())
            size += len(paragraph.strip()) + 2
            if size >= chunk_chars:
                chunks.append("\n\n".join(current))
                current, size = [], 0
    return chunks + (["\n\n".join(current)] if current else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(["word", "é", "日本", " ", "\t", "\n", "\r", "\x0b", "\x0c", "\u2028", "\x85"]), max_size=80))
def test_line_by_line_chunks_are_the_whole_text_chunks(tmp_path_factory, monkeypatch, pieces: list[str]) -> None:
    monkeypatch.setattr(data, "FILE_CHUNK_CHARS", 12)
    text = "".join(pieces)
    path = tmp_path_factory.mktemp("chunks") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = _reference_chunks(text, 12)
    if not expected:
        with pytest.raises(SqueezeError, match="contains no text"):
            load_documents(str(path))
    else:
        assert load_documents(str(path)) == expected


# --- defect 12: decoding --------------------------------------------------------------------


def test_one_bad_byte_is_one_replacement_and_the_rest_stays_intact(tmp_path: Path, caplog) -> None:
    before, after = "Crème brûlée — 日本語 " * 20, "naïve café. " * 20
    path = tmp_path / "notes.txt"
    path.write_bytes(before.encode("utf-8") + b"\xff" + after.encode("utf-8"))
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        docs = load_documents(str(path))
    assert docs == [(before + "\ufffd" + after).strip()]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "squeeze"]
    assert str(path) in warning and "1 byte" in warning


def test_random_bytes_named_txt_are_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(random.Random(0).randbytes(20_000))
    for source in (path, tmp_path):  # the file, and a folder holding it
        with pytest.raises(SqueezeError) as excinfo:
            load_documents(str(source))
        message = str(excinfo.value)
        assert "\n" not in message and str(path) in message and "not text" in message


def test_nul_bytes_are_not_text(tmp_path: Path) -> None:
    path = tmp_path / "dump.txt"
    path.write_bytes(b"header\x00\x00\x00\x00" * 100)
    with pytest.raises(SqueezeError, match="dump.txt is not text"):
        load_documents(str(path))


def test_a_legacy_single_byte_file_is_read_as_windows_1252_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "old.txt"
    text = "Café au lait, “quoted” — £5. " * 20
    path.write_bytes(text.encode("cp1252"))
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        assert load_documents(str(path)) == [text.strip()]
    assert any("Windows-1252" in r.getMessage() for r in caplog.records)


def test_the_cli_refuses_random_bytes_before_loading_anything(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(random.Random(1).randbytes(20_000))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_dir), "--data", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0]
    assert not out.exists()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=3000) | st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_are_text_or_one_squeeze_error(tmp_path_factory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "any.txt"
    path.write_bytes(raw)
    try:
        docs = load_documents(str(path))
        windows = evaluation_windows(CountingTokenizer(), str(path), seq_len=2)
    except SqueezeError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(doc == doc.strip() and doc for doc in docs)
        assert windows.dtype == torch.long and windows.shape[1] == 2
