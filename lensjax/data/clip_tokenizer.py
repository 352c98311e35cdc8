"""CLIP's byte-level BPE tokenizer (OpenAI's `SimpleTokenizer`), offline.

Text is fixed with ftfy, HTML-unescaped twice, whitespace-collapsed and lower-cased, split by
CLIP's pattern, byte-encoded and merged with the 48,894 BPE merges; ids 49406 / 49407 are the
start and end of text. `tokenize` gives (B, 77) int32 rows SOT ... EOT followed by zeros; a
longer text is cut to 77 tokens with EOT last (`truncate=True` semantics), so long hashtag
captions never fail.

The vocabulary file is read from the `open_clip_torch` package (`bpe_simple_vocab_16e6.txt.gz`)
without importing it (which would import torch): `pip install 'lensjax[clip]'`.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
            r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def default_vocab_file() -> Path:
    """open_clip's copy of OpenAI's merges; ImportError saying what to install otherwise."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / VOCAB_FILE
            if path.is_file():
                return path
    raise ImportError(f"CLIP's vocabulary ({VOCAB_FILE}) ships in the open_clip_torch "
                      "package: pip install 'lensjax[clip]' (or pass vocab_file=)")


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Every byte -> a printable character (OpenAI's table)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class ClipTokenizer:
    """`encode(text) -> [ids]`, `tokenize(texts) -> (B, 77) int32`."""

    def __init__(self, vocab_file: str | os.PathLike | None = None):
        import regex

        path = Path(vocab_file) if vocab_file is not None else default_vocab_file()
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        vocab = list(_bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, str] = {"<|startoftext|>": "<|startoftext|>",
                                       "<|endoftext|>": "<|endoftext|>"}

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._cache[token] = " ".join(word)
        return self._cache[token]

    @staticmethod
    def clean(text: str) -> str:
        """ftfy, HTML unescape (twice), whitespace collapsed, lower case."""
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without SOT / EOT."""
        ids = []
        for token in self.pattern.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token).split(" "))
        return ids

    def tokenize(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
                 ) -> np.ndarray:
        """(B, context_length) int32: SOT, the text's ids, EOT, zeros; cut to fit with EOT
        kept last."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, not a string")
            ids = [SOT_ID, *self.encode(text), EOT_ID][:context_length]
            ids[-1] = EOT_ID
            out[row, : len(ids)] = ids
        return out
