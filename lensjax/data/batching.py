"""Training batches: (image features, caption tokens) pairs in a seeded order, resumable.

Every (image, caption) pair is one example, as in LensToWords' training sets. Each epoch is a
permutation drawn from `(seed, epoch)`, so the order never depends on how far an earlier run
got: a restart at (epoch, batch) sees exactly the batches an uninterrupted run would.
With several processes (multi-host), every process walks the same global batches and takes
its own contiguous slice of rows.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lensjax.data.cache import FeatureCache
from lensjax.data.image_cache import ImageCache
from lensjax.data.tokenizer import MAX_LEN, GPT2Tokenizer, shift
from lensjax.data.word_vocab import WordVocabulary

# What turns captions into training sequences: GPT-2's BPE (v3) or a word vocabulary (v1/v2).
Tokenizer = GPT2Tokenizer | WordVocabulary


@dataclasses.dataclass
class Batch:
    """One process's rows of a global batch.

    features float16 (b, 64, D); inputs, targets int32 (b, max_len - 1); lengths int32 (b,)
    (caption tokens inside the sequence); keys: the image keys.
    """

    features: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    keys: list[str]


def available_pairs(
    captions: Mapping[str, Sequence[str]], cache: FeatureCache | ImageCache
) -> tuple[list[tuple[str, str]], list[str]]:
    """(image key, caption) pairs whose inputs (features, or decoded images) are in `cache`
    -> (pairs, the keys that are not)."""
    missing = [key for key in captions if key not in cache]
    skip = set(missing)
    pairs = [(k, c) for k, caps in captions.items() if k not in skip for c in caps]
    return pairs, missing


class _Examples:
    """(image key, caption) pairs tokenized once: keys, token sequences and lengths."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_len: int):
        self.keys = [key for key, _ in pairs]
        self.sequences, self.lengths = tokenizer.training_sequences(
            [caption for _, caption in pairs], max_len)

    def __len__(self) -> int:
        return len(self.keys)


class _Batches:
    """Fixed-size batches whose every epoch is planned from (seed, epoch) alone
    (`_plan`), read `prefetch` ahead on a background thread."""

    def __init__(self, cache: FeatureCache | ImageCache, batch_size: int, seed: int,
                 process_index: int, process_count: int):
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by {process_count} "
                             "processes")
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.rows = slice(process_index * batch_size // process_count,
                          (process_index + 1) * batch_size // process_count)

    def __len__(self) -> int:
        raise NotImplementedError

    def _plan(self, epoch: int):
        raise NotImplementedError

    def _batch(self, plan, index: int) -> Batch:
        raise NotImplementedError

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch` (this process's rows)."""
        return self._batch(self._plan(epoch), index)

    def epoch(self, epoch: int, start: int = 0, prefetch: int = 2) -> Iterator[Batch]:
        """Batches `start..len-1` of `epoch`, read `prefetch` ahead on a background thread."""
        plan = self._plan(epoch)
        if prefetch <= 0:
            for index in range(start, len(self)):
                yield self._batch(plan, index)
            return
        results: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for index in range(start, len(self)):
                    if stop.is_set():
                        return
                    results.put(self._batch(plan, index))
            except Exception as error:  # handed to the consumer, which re-raises it
                results.put(error)
            results.put(None)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := results.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    results.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    def _assemble(self, examples: _Examples, rows: np.ndarray) -> Batch:
        keys = [examples.keys[r] for r in rows]
        inputs, targets = shift(examples.sequences[rows])
        return Batch(self.cache.get_batch(keys), inputs, targets, examples.lengths[rows], keys)


class CaptionBatches(_Batches):
    """Fixed-size batches over (image key, caption) pairs; the last partial batch is dropped.
    `cache` gives each batch's inputs: a FeatureCache's features or an ImageCache's images."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        cache: FeatureCache | ImageCache,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_len: int = MAX_LEN,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__(cache, batch_size, seed, process_index, process_count)
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} examples cannot fill one batch of {batch_size}")
        self.examples = _Examples(pairs, tokenizer, max_len)
        self.keys = self.examples.keys

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.keys) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a permutation seeded by (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))

    _plan = order

    def _batch(self, order: np.ndarray, index: int) -> Batch:
        rows = order[index * self.batch_size : (index + 1) * self.batch_size][self.rows]
        return self._assemble(self.examples, rows)


def mix_counts(weights: Sequence[float], batch_size: int, batches: int) -> np.ndarray:
    """Rows per source in each of `batches` batches: (batches, sources) int, every row summing
    to `batch_size`, the running totals within one row of `weights` (normalised) times the
    rows so far (each batch gives its rows to the sources furthest behind their share)."""
    share = np.asarray(weights, np.float64) / np.sum(weights)
    counts = np.zeros((batches, len(share)), np.int64)
    given = np.zeros(len(share))
    for index in range(batches):
        need = share * batch_size * (index + 1) - given
        row = np.maximum(np.floor(need), 0).astype(np.int64)
        while row.sum() > batch_size:  # only when a share is below a row per batch
            row[np.argmax(row - need)] -= 1
        for _ in range(batch_size - int(row.sum())):
            row[np.argmax(need - row)] += 1
        counts[index] = row
        given += row
    return counts


class MixedBatches(_Batches):
    """Batches drawn from several named sources at fixed shares (`--mix`), for fine-tuning
    on a new domain without forgetting an old one.

    Each batch holds about `weights[name] * batch_size` rows of each source (`mix_counts`).
    The first source is the target: an epoch is as many batches as it takes to show each of
    its examples about once. Every source's rows of an epoch come from its own permutations
    seeded by (seed, epoch, source), repeated where the epoch needs more rows than the source
    has (sampling with replacement across passes) and cut where it needs fewer."""

    def __init__(
        self,
        sources: Mapping[str, Sequence[tuple[str, str]]],
        weights: Mapping[str, float],
        cache: FeatureCache | ImageCache,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_len: int = MAX_LEN,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__(cache, batch_size, seed, process_index, process_count)
        if set(sources) != set(weights) or not sources:
            raise ValueError(f"mix weights for {sorted(weights)} but sources "
                             f"{sorted(sources)}")
        if not all(w > 0 for w in weights.values()):
            raise ValueError(f"mix weights must be > 0, got {dict(weights)}")
        self.names = list(weights)
        self.weights = np.array([weights[n] for n in self.names], np.float64)
        self.weights /= self.weights.sum()
        self.examples = [_Examples(sources[n], tokenizer, max_len) for n in self.names]
        for name, examples in zip(self.names, self.examples, strict=True):
            if not len(examples):
                raise ValueError(f"mix source {name!r} has no examples")
        per_batch = self.weights[0] * batch_size
        self._length = max(1, int(len(self.examples[0]) // per_batch))
        self.counts = mix_counts(self.weights, batch_size, self._length)
        self._starts = np.cumsum(self.counts, axis=0) - self.counts  # rows before each batch

    def __len__(self) -> int:
        """Batches per epoch (the target source's examples, shown about once)."""
        return self._length

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """Each source's row stream for `epoch`."""
        streams = []
        for number, (examples, needed) in enumerate(zip(self.examples, self.counts.sum(0),
                                                        strict=True)):
            passes = -(-int(needed) // len(examples))
            streams.append(np.concatenate([
                np.random.default_rng([self.seed, epoch, number, k]).permutation(len(examples))
                for k in range(max(passes, 1))]))
        return streams

    def _batch(self, streams: list[np.ndarray], index: int) -> Batch:
        """This process's rows of batch `index`: the global batch lists each source's rows in
        source order; only the slice this process takes is read."""
        start, counts = self._starts[index], self.counts[index]
        sources = np.repeat(np.arange(len(self.examples)), counts)[self.rows]
        rows = np.concatenate([streams[s][start[s] : start[s] + counts[s]]
                               for s in range(len(self.examples))])[self.rows]
        parts = [self._assemble(examples, rows[sources == s])
                 for s, examples in enumerate(self.examples) if np.any(sources == s)]
        return Batch(np.concatenate([p.features for p in parts]),
                     *(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("inputs", "targets", "lengths")),
                     [k for p in parts for k in p.keys])
