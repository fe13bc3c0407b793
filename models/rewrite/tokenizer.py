"""A WordPiece tokenizer built here from the stream's own text (queries, titles, bidwords, codes).

Nothing is downloaded: the vocabulary is trained with the ``tokenizers`` library on the corpus at
hand, with every printable ASCII character in the alphabet so that a word never seen (a typo, a new
bidword) still splits into known pieces instead of ``[UNK]``. The tokenizer is stored as JSON in a
model's state (``to_json`` / ``from_json``), so a registry version carries it with the weights.

Special tokens: ``[PAD]`` ``[UNK]``, the task prompts of the generators (``<q2b>`` query → bidword,
``<q2t>`` / ``<t2q>`` query ↔ title for post-pre-training, ``<qc>`` / ``<tc>`` query / title → code
for GRAM), ``<sep>`` between prompt and target, ``<eos>`` after the target, ``<cls>`` for the
discriminator's cross-encoder.
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Sequence

SPECIALS = ("[PAD]", "[UNK]", "<q2b>", "<q2t>", "<t2q>", "<qc>", "<tc>", "<sep>", "<eos>", "<cls>")
ALPHABET = [c for c in string.printable if not c.isspace() and not c.isupper()]
_PRE = re.compile(r"\w+|[^\w\s]+")  # the Whitespace pre-tokenizer's split


def normalize(text: str) -> str:
    """Lower case, single spaces (the form bidwords are stored and compared in)."""
    return " ".join(str(text).lower().split())


class WordPieceTokenizer:
    def __init__(self, tok) -> None:  # a tokenizers.Tokenizer
        self._tok = tok
        v = tok.get_vocab()
        self.vocab_size = tok.get_vocab_size()
        self.special = {s: v[s] for s in SPECIALS}
        self.pad_id = self.special["[PAD]"]
        self.unk_id = self.special["[UNK]"]
        self.sep_id = self.special["<sep>"]
        self.eos_id = self.special["<eos>"]
        self.cls_id = self.special["<cls>"]

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> "WordPieceTokenizer":
        """A deterministic WordPiece vocabulary (the ``tokenizers`` trainer breaks ties differently
        from one process to the next): specials, the alphabet with its ``##`` continuations, the
        words seen at least ``min_frequency`` times (most frequent first, up to half the budget),
        then word-initial pieces and ``##`` word-final pieces by how often they occur; ties by text."""
        from collections import Counter

        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        words: Counter = Counter()
        for t in corpus:
            words.update(_PRE.findall(normalize(t)))
        vocab: dict[str, int] = {}

        def add(tok: str) -> None:
            if tok not in vocab and len(vocab) < max(vocab_size, len(SPECIALS) + 2 * len(ALPHABET)):
                vocab[tok] = len(vocab)

        for tok in (*SPECIALS, *ALPHABET, *("##" + c for c in ALPHABET)):
            add(tok)
        budget_words = len(vocab) + (vocab_size - len(vocab)) // 2
        for w, c in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
            if c < min_frequency or len(vocab) >= budget_words:
                break
            add(w)
        pieces: Counter = Counter()
        for w, c in words.items():
            for i in range(2, min(len(w), 8)):
                pieces[w[:i]] += c
            for i in range(max(1, len(w) - 7), len(w) - 1):
                pieces["##" + w[i:]] += c
        for p, c in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
            if c < min_frequency:
                break
            add(p)
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=40))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        return cls(tok)

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, s: str) -> "WordPieceTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(s))

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = self._tok.encode(normalize(text), add_special_tokens=False).ids
        return ids[:max_len] if max_len is not None else ids

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> list[list[int]]:
        out = [e.ids for e in self._tok.encode_batch([normalize(t) for t in texts], add_special_tokens=False)]
        return [ids[:max_len] for ids in out] if max_len is not None else out

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode([i for i in ids if i not in self.special.values()])
        return normalize(text.replace(" | ", "|").replace(" |", "|").replace("| ", "|"))

    def prompt(self, task: str, text: str, max_len: int) -> list[int]:
        """``<task> text <sep>`` (the text truncated to fit ``max_len``)."""
        return [self.special[task], *self.encode(text, max_len - 2), self.sep_id]
