"""The word vocabulary of LensToWords' first generations (v1, v2), as Keras built it.

v1 and v2 trained on Instagram captions, cleaned (`clean_caption`), wrapped in `<start>` /
`<end>`, filtered (v2: `is_bad_caption`, and captions of at most three words after cleaning
dropped) and indexed by Keras' `TextVectorization(split="whitespace", standardize=None)`:

- index 0 is the padding token `""`, 1 is `[UNK]`, then every other token by descending
  count, ties broken by descending token bytes (Keras sorts `np.lexsort((tokens, counts))`
  and reverses it), cut at `max_tokens` entries in all (v1 10,000, v2 8,000);
- splitting is on ASCII whitespace only (TensorFlow's), with no lower-casing and no
  punctuation stripping.

A vocabulary exported by the original (`vectorizer.get_vocabulary()`, one word per line, the
first line empty for the padding token) is read as is (`WordVocabulary.read`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

PAD, UNK, START, END = "", "[UNK]", "<start>", "<end>"
WORDS = "words"  # the tokenizer name a word-vocabulary checkpoint records
MAX_TOKENS = {"v1": 10_000, "v2": 8_000}
# The phrases v2 dropped captions for (they carry no visual information).
BAD_PHRASES = ("i love you", "thank you", "so cute", "amazing", "beautiful",
               "happy birthday", "love this")

_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION_OR_TAG = re.compile(r"[@#]\w+")
_ASTRAL = re.compile("([\U00010000-\U0010ffff])")  # most emoji live above the BMP
_EMOJI = re.compile("([\U0001F300-\U0001FAFF\u2600-\u27BF])")
_SKIN_TONE = re.compile("[\U0001F3FB-\U0001F3FF]")
_SPACES = re.compile(r"\s+")
_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")
_LETTER = re.compile(r"[a-zA-Z]")


class VocabularyError(ValueError):
    """A vocabulary file or argument that cannot be used, with the reason."""


def clean_caption(caption: object) -> str:
    """An Instagram caption as v1 and v2 cleaned it: URLs, @mentions and #hashtags removed,
    each emoji (and every character beyond the Basic Multilingual Plane) set apart by spaces,
    skin-tone modifiers dropped, whitespace collapsed, then `<start> ... <end>`. A caption
    that is not a string (an empty CSV cell) becomes `<start> <end>`."""
    if not isinstance(caption, str):
        return f"{START} {END}"
    text = _URL.sub("", caption).strip()
    text = _MENTION_OR_TAG.sub("", text).strip()
    text = _ASTRAL.sub(r" \1 ", text)
    text = _EMOJI.sub(r" \1 ", text)
    text = _SKIN_TONE.sub("", text)
    text = _SPACES.sub(" ", text).strip()
    return f"{START} {text} {END}"


def is_bad_caption(caption: str) -> bool:
    """v2's filter of a cleaned caption: True when, without `<start>`/`<end>` and with runs
    of one repeated word collapsed, it has at most two words or at most one word with a
    Latin letter, or when it contains one of `BAD_PHRASES` (case-insensitive)."""
    words = caption.replace(START, "").replace(END, "").split()
    words = [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
    if len(words) <= 2:
        return True
    lower = caption.lower().strip()
    if any(phrase in lower for phrase in BAD_PHRASES):
        return True
    return sum(1 for w in words if _LETTER.search(w)) <= 1


def prepare_captions(raw: Mapping[str, object], generation: str) -> dict[str, str]:
    """{key: raw caption} -> {key: cleaned caption} as `generation` ("v1" or "v2") kept
    them: v1 keeps every caption; v2 drops those of at most three words after cleaning
    (`<start>` and `<end>` included) and the bad ones (`is_bad_caption`)."""
    if generation not in MAX_TOKENS:
        raise VocabularyError(f"unknown generation {generation!r}; use v1 or v2")
    cleaned = {key: clean_caption(text) for key, text in raw.items()}
    if generation == "v1":
        return cleaned
    return {key: text for key, text in cleaned.items()
            if len(text.split()) > 3 and not is_bad_caption(text)}


def clean_captions(captions: Mapping[str, Sequence[object]], generation: str
                   ) -> dict[str, list[str]]:
    """{image key: [raw captions]} -> {image key: [captions as `generation` kept them]}:
    `prepare_captions`' cleaning and filtering caption by caption, the `<start>` / `<end>`
    markers taken off again (what a model of that generation learns to write; see
    `WordVocabulary.training_sequences`). Images left without a caption are dropped."""
    kept: dict[str, list[str]] = {}
    for key, texts in captions.items():
        prepared = prepare_captions(dict(enumerate(texts)), generation).values()
        words = [" ".join(text.split(" ")[1:-1]) for text in prepared]
        if words:
            kept[key] = words
    return kept


def wrap(caption: str) -> str:
    """A cleaned caption between the `<start>` and `<end>` markers, as the notebooks fed
    the vectorizer."""
    return f"{START} {caption} {END}" if caption else f"{START} {END}"


def token_weights(vocabulary: WordVocabulary, captions: Iterable[str]) -> np.ndarray:
    """v2's loss weights (V,) float32 from the cleaned captions (without markers) it trained
    on: `(total / count) ** 0.3` per vocabulary word (count 1 for a word the captions lack,
    such as the padding token and `[UNK]`), divided by their mean, clipped to [0.5, 3]. The
    counts are over the `<start> ... <end>` texts split as Python's `str.split`, as the
    notebook counted them."""
    counts = Counter(word for text in captions for word in wrap(text).split())
    total = sum(counts.values())
    weights = np.array([(total / counts.get(word, 1)) ** 0.3 for word in vocabulary.words],
                       np.float64)
    return np.clip(weights / weights.mean(), 0.5, 3.0).astype(np.float32)


def split_words(text: str) -> list[str]:
    """TensorFlow's whitespace split: ASCII whitespace only, no empty tokens."""
    return [word for word in _ASCII_SPACE.split(text) if word]


class WordVocabulary:
    """Words by index: 0 padding, 1 `[UNK]`, then the vocabulary's order."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:2] != [PAD, UNK]:
            raise VocabularyError(f"a vocabulary starts with the padding token '' and {UNK}, "
                                  f"found {words[:2]!r}")
        seen: dict[str, int] = {}
        for index, word in enumerate(words):
            if index > 0 and (not word or split_words(word) != [word]):
                raise VocabularyError(f"entry {index} ({word!r}) is not one word")
            if word in seen:
                raise VocabularyError(f"{word!r} is listed twice (entries {seen[word]} and "
                                      f"{index})")
            seen[word] = index
        self.words = words
        self._index = seen

    @classmethod
    def build(cls, captions: Iterable[str], max_tokens: int) -> WordVocabulary:
        """Keras' `TextVectorization(max_tokens, split="whitespace", standardize=None)
        .adapt(captions)`: by descending count, ties by descending token bytes."""
        if max_tokens < 3:
            raise VocabularyError(f"max_tokens must be at least 3, got {max_tokens}")
        counts = Counter(word for text in captions for word in split_words(text))
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        ranked = sorted(counts.items(), key=lambda item: (item[1], item[0].encode()),
                        reverse=True)
        return cls([PAD, UNK, *(word for word, _ in ranked[: max_tokens - 2])])

    @classmethod
    def read(cls, path: str | os.PathLike) -> WordVocabulary:
        """A vocabulary file: one word per line in index order, the first line empty (the
        padding token), as `get_vocabulary()` written line by line."""
        text = Path(path).read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines and lines[-1] == "" and len(lines) > 2:
            lines = lines[:-1]  # the file's final newline
        try:
            return cls(lines)
        except VocabularyError as error:
            raise VocabularyError(f"{path}: {error}") from None

    def write(self, path: str | os.PathLike) -> None:
        """The file `read` reads (atomically)."""
        from lensjax.files import write_text_atomic

        write_text_atomic(Path(path), "\n".join(self.words) + "\n")

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordVocabulary) and self.words == other.words

    def index(self, word: str) -> int:
        """The word's index; 1 (`[UNK]`) for a word outside the vocabulary."""
        return self._index.get(word, 1)

    def encode(self, text: str) -> list[int]:
        """Whitespace-split words -> indices, as the vectorizer maps them (unknown -> 1)."""
        return [self.index(word) for word in split_words(text)]

    @property
    def start_id(self) -> int:
        """`<start>`'s index (2 when it is the most frequent word, the notebooks' fallback)."""
        return self._index.get(START, 2)

    @property
    def end_id(self) -> int:
        """`<end>`'s index (3 by the notebooks' fallback)."""
        return self._index.get(END, 3)

    @property
    def period_id(self) -> int:
        """The index of "." (`end_id` when the vocabulary has no such word, so that a stop at
        a period changes nothing)."""
        return self._index.get(".", self.end_id)

    def to_metadata(self) -> dict[str, object]:
        """The checkpoint's `tokenizer` entry (`lensjax.json`): the words themselves."""
        return {"name": WORDS, "vocab_size": len(self), "words": list(self.words)}

    @classmethod
    def from_metadata(cls, entry: Mapping[str, object]) -> WordVocabulary:
        """Inverse of `to_metadata`; VocabularyError naming what is wrong."""
        words = entry.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise VocabularyError("tokenizer.words must be a list of strings")
        if entry.get("vocab_size") != len(words):
            raise VocabularyError(f"tokenizer.vocab_size is {entry.get('vocab_size')!r} but "
                                  f"tokenizer.words lists {len(words)}")
        return cls(words)

    def training_sequences(self, captions: Sequence[str], max_len: int
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned captions (without markers) -> (sequences int32 (N, max_len), lengths
        int32 (N,)): `<start> words <end>` as indices, cut after `max_len` and padded with 0
        (the notebooks' `pad_sequences(..., padding="post", truncating="post")`); a length
        counts the sequence's targets (its tokens after `<start>`), so that the shifted pair
        (seq[:, :-1], seq[:, 1:]) is the notebooks' (x, y)."""
        sequences = np.zeros((len(captions), max_len), np.int32)
        lengths = np.zeros(len(captions), np.int32)
        for row, caption in enumerate(captions):
            ids = self.encode(wrap(caption))[:max_len]
            sequences[row, : len(ids)] = ids
            lengths[row] = len(ids) - 1
        return sequences, lengths

    def decode_caption(self, ids: Iterable[int]) -> str:
        """Generated ids -> the caption (`decode`)."""
        return self.decode(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Indices -> the caption's words joined by spaces, without padding, `<start>` and
        `<end>`; decoding stops at the first `<end>`."""
        words = []
        for i in ids:
            word = self.words[int(i)]
            if word == END:
                break
            if word not in (PAD, START):
                words.append(word)
        return " ".join(words)
