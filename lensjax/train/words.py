"""What a v1 or v2 phase adds to a run: the word vocabulary (a checkpoint's, or built from
the phase's captions as the notebooks built it), the model configuration sized to it, and v2's
loss weights. The other families read GPT-2's fixed BPE instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from lensjax.data.word_vocab import (
    MAX_TOKENS,
    WORDS,
    VocabularyError,
    WordVocabulary,
    token_weights,
    wrap,
)
from lensjax.train.inputs import Data
from lensjax.train.messages import TrainError


def generation_of(cfg) -> str | None:
    """The generation of a word model's configuration ("v1" or "v2"); None for the GPT-2
    families."""
    from lensjax.models.lstm import WordModelConfig

    return type(cfg).family if isinstance(cfg, WordModelConfig) else None


def _every_caption(data: Data) -> Iterator[str]:
    """The cleaned captions of the training and validation sets (and of each --mix source),
    the corpus the notebooks adapted their vectorizer on."""
    # with --mix, `parts` holds every source's (train, val), the target's among them
    pairs = data.parts.values() if data.parts else [(data.train, data.val)]
    for part in (captions for pair in pairs for captions in pair):
        for captions in part.values():
            yield from captions


def word_vocabulary(cfg, data: Data, metadata: Mapping[str, Any] | None, say
                    ) -> WordVocabulary:
    """The run's vocabulary: the one `metadata` (the checkpoint the decoder comes from, or
    latest/ on --resume) carries, else Keras' `TextVectorization` adapted on the phase's
    cleaned captions with the generation's `max_tokens` (v1 10,000, v2 8,000)."""
    generation = generation_of(cfg)
    if metadata is not None:
        entry = metadata.get("tokenizer") or {}
        if entry.get("name") != WORDS:
            raise TrainError(f"the {generation} decoder's checkpoint carries no word "
                             "vocabulary (its tokenizer is "
                             f"{entry.get('name', 'gpt2')!r})")
        try:
            return WordVocabulary.from_metadata(entry)
        except VocabularyError as error:
            raise TrainError(f"the decoder's checkpoint: {error}") from None
    vocabulary = WordVocabulary.build(map(wrap, _every_caption(data)), MAX_TOKENS[generation])
    say(f"word vocabulary: {len(vocabulary)} entries (at most {MAX_TOKENS[generation]:,}) "
        "from the phase's cleaned captions")
    return vocabulary


def sized_to(cfg, vocabulary: WordVocabulary):
    """`cfg` with its decoder's vocabulary size and `<start>` / `<end>` ids from
    `vocabulary`."""
    decoder = dataclasses.replace(cfg.decoder, vocab_size=len(vocabulary),
                                  start_id=vocabulary.start_id, end_id=vocabulary.end_id)
    return dataclasses.replace(cfg, decoder=decoder)


def loss_weights(vocabulary: WordVocabulary, data: Data) -> np.ndarray:
    """v2's per-word loss weights (V,) over the phase's cleaned captions (`token_weights`)."""
    return token_weights(vocabulary, _every_caption(data))
