"""The .txt files of a text source: decoded, checked to be text, and cut into documents that know
where they lie in the file, so that a large file is read a line at a time and never held whole.

A file is read as UTF-8; each byte that is not UTF-8 becomes U+FFFD and is counted. A file with
such bytes and no UTF-8 character beyond ASCII is a legacy single-byte file and is read as
Windows-1252 (Latin-1 plus the quotes and dashes Windows puts in 0x80-0x9F). A file in which more
than MAX_BAD_FRACTION of the characters are unreadable bytes or control characters (NUL, ESC, ...)
is not text and is refused; a few unreadable bytes get one warning line on the ``squeeze`` logger.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from squeeze.errors import SqueezeError

MAX_BAD_FRACTION = 0.02  # more unreadable bytes and control characters than this: not text
LEGACY_ENCODING = "cp1252"
BLOCK_BYTES = 1 << 20  # a large file is surveyed this many bytes at a time

log = logging.getLogger("squeeze")

_ESCAPED = re.compile("[\udc80-\udcff]")  # a byte the UTF-8 decoder could not read (surrogateescape)
_CONTROL = bytes(b for b in range(256) if (b < 0x20 and b not in b"\t\n\x0b\x0c\r") or b == 0x7F)
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL)
_CP1252_UNDEFINED = b"\x81\x8d\x8f\x90\x9d"


@dataclass(frozen=True)
class TextFile:
    """How a file decodes: its encoding and what in it is not text."""

    path: Path
    encoding: str  # "utf-8" or LEGACY_ENCODING
    chars: int
    replaced: int  # bytes not valid in ``encoding``, read as U+FFFD
    control: int  # control characters other than the whitespace ones (tab, newlines, form feed)
    sha256: str  # of the file's bytes

    def decode(self, raw: bytes) -> str:
        return decode(raw, self.encoding)


def decode(raw: bytes, encoding: str) -> str:
    """``raw`` as text; in UTF-8 each byte that is not UTF-8 becomes one U+FFFD."""
    if encoding != "utf-8":
        return raw.decode(encoding, errors="replace")
    text = raw.decode("utf-8", errors="surrogateescape")
    return text if text.isascii() else _ESCAPED.sub("\ufffd", text)


class _Survey:
    """Counts over a file's bytes, fed a block at a time, that decide how it decodes."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.digest = hashlib.sha256()
        self.size = self.utf8_chars = self.non_ascii = self.escaped = self.control = self.undefined = 0

    def add(self, block: bytes, final: bool = False) -> None:
        self.digest.update(block)
        self.size += len(block)
        self.control += len(block.translate(None, _NOT_CONTROL))
        self.undefined += sum(block.count(byte) for byte in _CP1252_UNDEFINED)
        text = self.decoder.decode(block, final)
        self.utf8_chars += len(text)
        if not text.isascii():
            escaped = len(_ESCAPED.findall(text))
            self.escaped += escaped
            self.non_ascii += len(text) - len(text.encode("ascii", errors="ignore")) - escaped

    def result(self, path: Path) -> TextFile:
        if self.escaped and not self.non_ascii:
            return TextFile(path, LEGACY_ENCODING, self.size, self.undefined, self.control, self.digest.hexdigest())
        return TextFile(path, "utf-8", self.utf8_chars, self.escaped, self.control, self.digest.hexdigest())


def open_text(path: Path) -> TextFile:
    """Read ``path`` once, a block at a time, and say how it decodes. Raises SqueezeError naming the
    file when it cannot be read or is not text; warns (one line) about bytes read as U+FFFD."""
    survey = _Survey()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
                survey.add(block)
    except OSError as exc:
        raise SqueezeError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    survey.add(b"", final=True)
    return _checked(survey.result(path))


def read_text(path: Path, check: bool = True) -> tuple[TextFile, str]:
    """A whole file and its text; with ``check``, refused or warned about as :func:`open_text` does."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SqueezeError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    survey = _Survey()
    survey.add(raw, final=True)
    file = _checked(survey.result(path)) if check else survey.result(path)
    return file, file.decode(raw)


def _checked(file: TextFile) -> TextFile:
    bad = file.replaced + file.control
    if bad > 1 and bad > MAX_BAD_FRACTION * file.chars:
        raise SqueezeError(
            f"{file.path} is not text: {bad:,} of its {file.chars:,} characters are bytes that are not UTF-8 "
            "or control characters such as NUL; a text source must be UTF-8 text"
        )
    if file.encoding != "utf-8":
        log.warning(f"{file.path} is not UTF-8 and has no UTF-8 characters beyond ASCII: read as Windows-1252 (Latin-1)")
    elif file.replaced:
        log.warning(f"{file.path}: {file.replaced:,} byte(s) that are not UTF-8 were read as U+FFFD")
    return file


@dataclass(frozen=True)
class Place:
    """Where one document of a path source lies: bytes [start, end) of a .txt file (a paragraph
    chunk), or a whole file of a folder (end None)."""

    file: TextFile
    start: int
    end: int | None
    key: float  # a number fixed by its text (the caller's key function): its side and its order


@functools.lru_cache(maxsize=8)
def file_places(
    stamps: tuple[tuple[str, int, int], ...], folder: bool, chunk_chars: int, key: Callable[[str], float]
) -> tuple[Place, ...]:
    """The documents of files ``(path, size, mtime_ns)``: each file whole (``folder``) or cut by
    :func:`paragraph_chunks`, empty ones left out. Cached by the sizes and times, so a file's checks
    and warnings come once per version of it."""
    places: list[Place] = []
    for name, _, _ in stamps:
        if folder:
            file, text = read_text(Path(name))
            if text.strip():
                places.append(Place(file, 0, None, key(text.strip())))
        else:
            file = open_text(Path(name))
            places += [Place(file, start, end, key(text)) for text, start, end in paragraph_chunks(file, chunk_chars)]
    return tuple(places)


def read_places(places: Iterable[Place]) -> Iterator[str]:
    """The documents' texts, read one at a time."""
    for place in places:
        if place.end is None:
            yield read_text(place.file.path, check=False)[1].strip()
        else:
            yield read_chunk(place.file, place.start, place.end)


def paragraph_chunks(file: TextFile, chunk_chars: int) -> Iterator[tuple[str, int, int]]:
    """Whole blank-line paragraphs of ``file`` grouped into documents of at least ``chunk_chars``
    characters, each with the byte range [start, end) it was read from; one line in memory at a time."""
    with open(file.path, "rb") as handle:
        yield from _chunks(_lines(handle, 0), file.encoding, chunk_chars)


def read_chunk(file: TextFile, start: int, end: int) -> str:
    """The document :func:`paragraph_chunks` found at bytes [start, end) of ``file``."""
    with open(file.path, "rb") as handle:
        handle.seek(start)
        segment = handle.read(end - start)
    chunks = _chunks(_lines(io.BytesIO(segment), start), file.encoding, math.inf)
    return next((text for text, _, _ in chunks), "")


def _lines(handle: Iterable[bytes], offset: int) -> Iterator[tuple[int, bytes]]:
    """Lines cut at b"\\n" only (never at \\r), with the byte offset each starts at."""
    for raw in handle:
        yield offset, raw
        offset += len(raw)


def _chunks(lines: Iterable[tuple[int, bytes]], encoding: str, chunk_chars: float) -> Iterator[tuple[str, int, int]]:
    # A paragraph is a run of lines that are not all whitespace: re.split(r"\n\s*\n", text) on the
    # whole text, done a line at a time. Paragraphs are stripped and joined by a blank line.
    paragraphs: list[str] = []
    lines_of_paragraph: list[str] = []
    size = start = end = 0
    for offset, raw in lines:
        line = decode(raw, encoding)
        if line and not line.isspace():
            if not paragraphs and not lines_of_paragraph:
                start = offset
            lines_of_paragraph.append(line)
            end = offset + len(raw)
            continue
        if lines_of_paragraph:
            paragraphs.append("".join(lines_of_paragraph).strip())
            size += len(paragraphs[-1]) + 2
            lines_of_paragraph = []
            if size >= chunk_chars:
                yield "\n\n".join(paragraphs), start, end
                paragraphs, size = [], 0
    if lines_of_paragraph:
        paragraphs.append("".join(lines_of_paragraph).strip())
    if paragraphs:
        yield "\n\n".join(paragraphs), start, end
