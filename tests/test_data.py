"""Text sources, the calibration/evaluation split, and token windows."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from squeeze.data import (
    BUILTIN_SOURCES,
    TextSplit,
    calibration_windows,
    clean_wikitext,
    evaluation_windows,
    load_documents,
    split_documents,
    text_split,
    token_windows,
)
from squeeze.errors import SqueezeError
from squeeze.packages import MINILM


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM.root())


@pytest.fixture(scope="module")
def word_tokenizer():
    """A whitespace word-level tokenizer with an EOS token, built without any download."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["</s>", "<unk>"] + [f"w{i}" for i in range(100)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- built-in sources -------------------------------------------------------------------------


def test_builtin_names_listed():
    assert set(BUILTIN_SOURCES) == {"bbc", "wikipedia", "shakespeare"}


def test_bbc_articles():
    docs = load_documents("bbc")
    assert len(docs) == 2225
    assert all(len(doc) > 100 for doc in docs)
    assert docs[0].startswith("Ad sales boost Time Warner profit")
    assert "\ufffd" not in "".join(docs[:50])


def test_wikipedia_is_clean_prose():
    docs = load_documents("wikipedia")
    assert len(docs) >= 50
    assert all(len(doc) >= 200 for doc in docs)
    text = "\n".join(docs)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "&amp;", "&nbsp;", "thumb|", "'''", "<!--"):
        assert markup not in text, markup
    assert any(doc.startswith("Anarchism is a political philosophy") for doc in docs)
    # Prose: most lines are long sentences, not list or table debris.
    lines = [line for line in text.splitlines() if line]
    assert sum(len(line) > 80 for line in lines) > 0.6 * len(lines)


def test_shakespeare_one_edition_per_play_without_boilerplate():
    docs = load_documents("shakespeare")
    assert 35 <= len(docs) <= 45  # one of the two editions of each play, plus the poems
    text = "\n".join(docs)
    assert "project gutenberg" not in text.lower()
    assert "*** START" not in text and "*** END" not in text
    hamlets = [doc for doc in docs if doc.startswith("HAMLET")]
    assert len(hamlets) == 1
    assert "To be, or not to be" in hamlets[0]


def test_load_documents_returns_a_fresh_list():
    docs = load_documents("shakespeare")
    docs.clear()
    assert load_documents("shakespeare")


def test_unknown_source_names_the_valid_ones(tmp_path):
    for source in ("wikitext-2", str(tmp_path / "missing.txt")):
        with pytest.raises(SqueezeError, match="bbc, wikipedia, shakespeare"):
            load_documents(source)


# --- wiki markup ---------------------------------------------------------------------------------


def test_clean_wikitext_removes_markup():
    wikitext = (
        "{{Infobox person|name=X|spouse={{marriage|Y}}}}\n"
        "[[File:A.jpg|thumb|A caption with [[a link]]]]\n"
        "'''Ada''' ({{IPAc-en|ˈ|eɪ|d|ə}}) was a [[mathematician|mathematical]] writer, "
        "see [http://example.org the site].<ref name=a>A source.</ref> She worked on "
        "the [[Analytical Engine]].<!-- a comment --> It was long ago &ndash; in London.\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "== Life ==\n"
        "* a list item\n"
        "She lived in [[London]].<ref>Other.</ref>\n"
        "== References ==\n"
        "Everything after this heading is dropped.\n"
        "[[Category:Mathematicians]]"
    )
    text = clean_wikitext(wikitext)
    first_sentences = "Ada was a mathematical writer, see the site. She worked on the Analytical Engine. It"
    assert text.startswith(first_sentences)
    assert "It was long ago – in London.\n" in text
    assert re.search(r"\n\nLife\n+She lived in London\.$", text)
    junk = ("Infobox", "caption", "cell", "list item", "source", "comment", "References", "dropped")
    assert "Category" not in text
    for word in junk:
        assert word not in text, word


# --- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_near_the_fraction():
    docs = load_documents("bbc")
    first = split_documents(docs, eval_fraction=0.2)
    assert first == split_documents(list(docs), eval_fraction=0.2)
    assert not set(first.calibration) & set(first.evaluation)
    assert len(first.calibration) + len(first.evaluation) == len(docs)
    assert 0.15 < len(first.evaluation) / len(docs) < 0.25
    assert isinstance(text_split("bbc"), TextSplit)


def test_split_of_a_document_ignores_the_other_documents():
    docs = [f"document number {i}" for i in range(200)]
    whole = split_documents(docs)
    for doc in docs[::17]:
        alone = split_documents([doc])
        assert (doc in alone.evaluation) == (doc in whole.evaluation)
    # Duplicates land on the same side.
    doubled = split_documents(docs + docs)
    assert not set(doubled.calibration) & set(doubled.evaluation)


def test_split_is_the_same_in_another_process():
    code = (
        "from squeeze.data import split_documents;"
        "s = split_documents([f'document number {i}' for i in range(200)]);"
        "print(','.join(s.evaluation))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = split_documents([f"document number {i}" for i in range(200)])
    assert out.strip() == ",".join(here.evaluation)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 2])
def test_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(SqueezeError):
        split_documents(["a", "b"], eval_fraction=fraction)


# --- token windows -----------------------------------------------------------------------------


def test_windows_are_back_to_back_slices_of_the_stream(minilm_tokenizer):
    docs = load_documents("bbc")[:20]
    stream = []
    for doc in docs:
        if stream:
            stream.append(minilm_tokenizer.sep_token_id)  # MiniLM has no EOS; SEP separates documents
        stream.extend(_ids(minilm_tokenizer, doc))
    windows = token_windows(minilm_tokenizer, docs, seq_len=128)
    assert windows.dtype == torch.long
    assert windows.shape == (len(stream) // 128, 128)
    assert windows.flatten().tolist() == stream[: windows.numel()]
    assert minilm_tokenizer.cls_token_id not in windows.flatten().tolist()


def test_max_windows_and_stride(minilm_tokenizer):
    docs = load_documents("bbc")[:50]
    full = token_windows(minilm_tokenizer, docs, seq_len=64)
    few = token_windows(minilm_tokenizer, docs, seq_len=64, max_windows=5)
    assert few.shape == (5, 64)
    assert torch.equal(few, full[:5])
    overlapping = token_windows(minilm_tokenizer, docs, seq_len=64, max_windows=4, stride=32)
    assert overlapping.shape == (4, 64)
    assert torch.equal(overlapping[1, :32], overlapping[0, 32:])
    assert torch.equal(overlapping[2], full[1])


def test_documents_are_joined_by_eos(word_tokenizer):
    windows = token_windows(word_tokenizer, ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"], seq_len=4)
    eos = word_tokenizer.eos_token_id
    w = [word_tokenizer.convert_tokens_to_ids(f"w{i}") for i in range(10)]
    assert windows.tolist() == [[w[1], w[2], w[3], eos], [w[4], w[5], eos, w[6]]]  # tail "w7 w8 w9" dropped


def test_too_little_text_says_how_many_tokens(word_tokenizer):
    with pytest.raises(SqueezeError, match=r"7 tokens available, 12 needed"):
        token_windows(word_tokenizer, ["w1 w2 w3", "w4 w5 w6"], seq_len=4, max_windows=3)
    with pytest.raises(SqueezeError, match=r"3 tokens available, 4 needed"):
        token_windows(word_tokenizer, ["w1 w2 w3"], seq_len=4)
    with pytest.raises(SqueezeError, match="0 tokens available"):
        token_windows(word_tokenizer, [], seq_len=4)


def test_calibration_and_evaluation_windows_come_from_their_own_sides(minilm_tokenizer):
    calibration = calibration_windows(minilm_tokenizer, "wikipedia", n_samples=8, seq_len=256)
    assert calibration.shape == (8, 256)
    evaluation = evaluation_windows(minilm_tokenizer, "wikipedia", seq_len=512, max_tokens=512 * 32 + 100)
    assert evaluation.shape == (32, 512)  # at least 16k tokens of clean evaluation text
    split = text_split("wikipedia")
    evaluation_ids = _joined_ids(minilm_tokenizer, split.evaluation)
    assert _joined_ids(minilm_tokenizer, [evaluation[0, :40].tolist()]) in evaluation_ids
    assert _joined_ids(minilm_tokenizer, [calibration[0, :40].tolist()]) not in evaluation_ids


def _joined_ids(tokenizer, docs) -> str:
    """Token ids as ",1,2,3," strings, so that a window's presence in a text is a substring test."""
    lists = [doc if isinstance(doc, list) else _ids(tokenizer, doc) for doc in docs]
    return "|".join("," + ",".join(map(str, ids)) + "," for ids in lists)


def test_evaluation_budget_caps_but_does_not_require(tmp_path, word_tokenizer):
    paragraphs = [" ".join(f"w{i % 100}" for i in range(j, j + 700)) for j in range(30)]
    (tmp_path / "notes.txt").write_text("\n\n".join(paragraphs))
    source = str(tmp_path / "notes.txt")
    everything = evaluation_windows(word_tokenizer, source, seq_len=16)
    capped = evaluation_windows(word_tokenizer, source, seq_len=16, max_tokens=16 * 3 + 5)
    assert capped.shape == (3, 16) and torch.equal(capped, everything[:3])
    generous = evaluation_windows(word_tokenizer, source, seq_len=16, max_tokens=10**9)
    assert torch.equal(generous, everything)
    with pytest.raises(SqueezeError, match="calibration split"):
        calibration_windows(word_tokenizer, source, n_samples=10**6, seq_len=16)


# --- file and folder sources -------------------------------------------------------------------


def test_txt_file_is_cut_into_paragraph_chunks(tmp_path):
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(100)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    docs = load_documents(str(path))
    assert 10 <= len(docs) <= 25
    assert all(len(doc) < 2000 + 400 for doc in docs)
    assert [p.strip() for doc in docs for p in doc.split("\n\n")] == [p.strip() for p in paragraphs]
    split = text_split(str(path))
    assert split.calibration and split.evaluation


def test_folder_gives_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n\nWith two paragraphs.")
    (tmp_path / "a.txt").write_bytes("Caf\xe9 in Latin-1.".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.md").write_text("not text")
    assert load_documents(str(tmp_path)) == ["Café in Latin-1.", "Second file.\n\nWith two paragraphs."]


def test_empty_sources_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SqueezeError, match="no text; use one of bbc, wikipedia, shakespeare"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(SqueezeError, match="no .txt files; use one of bbc, wikipedia, shakespeare"):
        load_documents(str(tmp_path / "sub"))
