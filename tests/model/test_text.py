"""pre_caption and tokenization against the official pipeline (docs/model.md §4.1, 5.1-5.2)."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from albef.model.text import CLS_ID, pre_caption

VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def test_vocab_is_bert_base_uncased(vocab_path: Path) -> None:
    assert hashlib.sha256(vocab_path.read_bytes()).hexdigest() == VOCAB_SHA256


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man's dog -- running/jumping!!", "a mans dog running jumping"),
        ("<person> rides a bike.", "person rides a bike"),
        ("Two   dogs,  playing\tin the snow", "two dogs playing\tin the snow"),  # single tab is kept
        ("  Hello;  World: (test) *#~ \n", "hello world test"),
        ('He said "hi?"', "he said hi"),
        ("well-known half/full", "well known half full"),
        ("", ""),
    ],
)
def test_pre_caption_edge_cases(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_keeps_first_30_words() -> None:
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)).split(" ") == words[:30]
    assert pre_caption(" ".join(words), max_words=5) == "w0 w1 w2 w3 w4"


# --- an independent oracle: HF 4.8's slow BasicTokenizer + WordpieceTokenizer, written out for the test ---


def _load_vocab(path: Path) -> dict[str, int]:
    return {line.rstrip("\n"): i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())}


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(
        lo <= cp <= hi
        for lo, hi in [
            (0x4E00, 0x9FFF),
            (0x3400, 0x4DBF),
            (0x20000, 0x2A6DF),
            (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F),
            (0x2B820, 0x2CEAF),
            (0xF900, 0xFAFF),
            (0x2F800, 0x2FA1F),
        ]
    )


def _slow_tokenize(text: str, vocab: dict[str, int]) -> list[int]:
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        out.append(" " if ch in " \t\n\r" or unicodedata.category(ch) == "Zs" else ch)
    text = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in out)
    pieces: list[str] = []
    for tok in text.strip().split():
        tok = "".join(c for c in unicodedata.normalize("NFD", tok.lower()) if unicodedata.category(c) != "Mn")
        cur = ""
        for ch in tok:
            if _is_punct(ch):
                if cur:
                    pieces.append(cur)
                pieces.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            pieces.append(cur)
    ids: list[int] = []
    for word in pieces:
        if len(word) > 100:
            ids.append(vocab["[UNK]"])
            continue
        start, sub = 0, []
        while start < len(word):
            end, found = len(word), None
            while start < end:
                cand = ("##" if start else "") + word[start:end]
                if cand in vocab:
                    found = cand
                    break
                end -= 1
            if found is None:
                sub = [vocab["[UNK]"]]
                break
            sub.append(vocab[found])
            start = end
        ids.extend(sub)
    return ids


CAPTIONS = [
    "A man's dog -- running/jumping!!",
    "<person> is holding a café latte & croissant",
    "Naïve résumé of the Übermensch",
    "a dog 🐕 on the beach at 3:45pm",
    "an extraordinarilylongwordthatisnotinthevocabulary" * 3,
    "x" * 120,
    "中文 caption with 漢字",
    "two dogs " * 25,
    "",
    "   ",
    "tab\tseparated\nnewline",
]


def test_tokenizer_matches_slow_bert_oracle(tokenizer, vocab_path: Path) -> None:
    vocab = _load_vocab(vocab_path)
    ids, mask = tokenizer(CAPTIONS)
    assert ids.dtype == np.int64 and ids.shape == (len(CAPTIONS), 30) and mask.shape == ids.shape
    for row, cap in enumerate(CAPTIONS):
        expected = [CLS_ID, *_slow_tokenize(pre_caption(cap), vocab)[:29]]
        n = len(expected)
        assert ids[row, :n].tolist() == expected, cap
        assert (ids[row, n:] == 0).all() and mask[row, :n].all() and not mask[row, n:].any()
        assert 102 not in ids[row].tolist()  # never a [SEP]


def test_known_ids(tokenizer) -> None:
    ids, mask = tokenizer(["A man's dog -- running/jumping!!"])
    # [CLS] a mans dog running jumping; "mans" is a whole word in bert-base-uncased
    assert ids[0, :6].tolist() == [101, 1037, 16042, 3899, 2770, 8660]
    assert mask[0].sum() == 6


def test_truncation_to_29_wordpieces(tokenizer) -> None:
    ids, mask = tokenizer(["dog " * 40])
    assert mask[0].sum() == 30 and ids[0, 0] == CLS_ID and (ids[0, 1:] == 3899).all()


def test_tokenizer_roundtrip_file(tokenizer, tmp_path: Path) -> None:
    from albef.model.text import AlbefTokenizer

    tokenizer.save(tmp_path / "tokenizer.json")
    again = AlbefTokenizer.from_file(tmp_path / "tokenizer.json")
    a, b = tokenizer(CAPTIONS), again(CAPTIONS)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_tokenizer_rejects_bare_string(tokenizer) -> None:
    with pytest.raises(TypeError):
        tokenizer("a caption")
