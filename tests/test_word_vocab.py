"""v1/v2's word vocabulary: Instagram caption cleaning, v2's filter, and the vocabulary
against Keras' own TextVectorization (split="whitespace", standardize=None)."""

import random

import numpy as np
import pytest

from lensjax.data.word_vocab import (
    VocabularyError,
    WordVocabulary,
    clean_caption,
    is_bad_caption,
    prepare_captions,
    split_words,
)


def test_cleaning_removes_links_mentions_tags_and_sets_emoji_apart():
    raw = "Sunset 🌅🌅 at the beach https://t.co/x @anna #travel www.site.com  👍🏽 ok☀fine"
    assert clean_caption(raw) == "<start> Sunset 🌅 🌅 at the beach 👍 ok ☀ fine <end>"
    assert clean_caption(float("nan")) == "<start> <end>"
    assert clean_caption("#only #tags") == "<start>  <end>"  # the original's two spaces


def test_v2_filter_and_the_three_word_rule():
    assert is_bad_caption("<start> I love you so much <end>")  # a stock phrase
    assert is_bad_caption("<start> 😍 😍 😍 wow 😍 <end>")  # one word with letters
    assert is_bad_caption("<start> hi hi there <end>")  # two words once runs collapse
    assert not is_bad_caption("<start> a red car by the sea <end>")
    raw = {"a": "a red car by the sea", "b": "wow", "c": "Amazing view of the hills", "d": None}
    assert list(prepare_captions(raw, "v2")) == ["a"]
    assert list(prepare_captions(raw, "v1")) == ["a", "b", "c", "d"]
    with pytest.raises(VocabularyError):
        prepare_captions(raw, "v3")


def _corpus(seed, lines=300):
    rng = random.Random(seed)
    words = ["a", "A", "dog", "Dog", "the", "sea", "😀", "🌅", "x", "zebra", "éclair", "naïve",
             "[UNK]", "runs", "!", "...", "b", "c", "d", "e"] + [f"w{i}" for i in range(60)]
    texts = []
    for _ in range(lines):
        n = rng.randint(1, 9)
        body = " ".join(rng.choice(words) for _ in range(n))
        texts.append(clean_caption(body) + rng.choice(["", " ", "\t", "\u00a0word"]))
    return texts


@pytest.mark.parametrize("max_tokens", [12, 40, 1000])
def test_vocabulary_equals_keras_textvectorization(max_tokens):
    tf = pytest.importorskip("tensorflow")
    train, held_out = _corpus(0), _corpus(1, 50)
    keras_vectorizer = tf.keras.layers.TextVectorization(
        max_tokens=max_tokens, standardize=None, split="whitespace", output_mode="int")
    keras_vectorizer.adapt(train)
    ours = WordVocabulary.build(train, max_tokens)
    assert ours.words == list(keras_vectorizer.get_vocabulary())
    for text in held_out:
        expected = keras_vectorizer(tf.constant([text])).numpy()[0]
        np.testing.assert_array_equal(ours.encode(text), expected[expected != 0])


def test_splitting_is_on_ascii_whitespace_only():
    assert split_words(" a\tb\n\u00a0c\u3000d  ") == ["a", "b", "\u00a0c\u3000d"]


def test_vocabulary_file_round_trip_and_bad_files(tmp_path):
    vocab = WordVocabulary.build(["<start> a b b c <end>"], 10)
    # Ties by descending bytes: "c" > "a" > "<start>" > "<end>".
    assert vocab.words == ["", "[UNK]", "b", "c", "a", "<start>", "<end>"]
    vocab.write(tmp_path / "vocab.txt")
    assert (tmp_path / "vocab.txt").read_text().startswith("\n[UNK]\nb\n")
    assert WordVocabulary.read(tmp_path / "vocab.txt") == vocab
    assert vocab.encode("<start> b zzz <end>") == [5, 2, 1, 6]
    assert vocab.decode([5, 2, 1, 3, 6, 4, 0]) == "b [UNK] c"
    for text, problem in (("[UNK]\nb\n", "starts with"), ("\n[UNK]\nb\nb\n", "twice"),
                          ("\n[UNK]\nb c\n", "not one word")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(VocabularyError, match=problem):
            WordVocabulary.read(tmp_path / "bad.txt")
