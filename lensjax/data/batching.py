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
from lensjax.data.tokenizer import MAX_LEN, GPT2Tokenizer, build_sequences, shift


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


class CaptionBatches:
    """Fixed-size batches over (image key, caption) pairs; the last partial batch is dropped.
    `cache` gives each batch's inputs: a FeatureCache's features or an ImageCache's images."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        cache: FeatureCache,
        tokenizer: GPT2Tokenizer,
        *,
        batch_size: int,
        max_len: int = MAX_LEN,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by {process_count} "
                             "processes")
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} examples cannot fill one batch of {batch_size}")
        self.keys = [key for key, _ in pairs]
        self.sequences, self.lengths = build_sequences(
            tokenizer.encode_batch([caption for _, caption in pairs]), max_len
        )
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.rows = slice(process_index * batch_size // process_count,
                          (process_index + 1) * batch_size // process_count)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.keys) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a permutation seeded by (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch` (this process's rows)."""
        return self._rows_batch(self.order(epoch), index)

    def epoch(self, epoch: int, start: int = 0, prefetch: int = 2) -> Iterator[Batch]:
        """Batches `start..len-1` of `epoch`, read `prefetch` ahead on a background thread."""
        order = self.order(epoch)
        if prefetch <= 0:
            for index in range(start, len(self)):
                yield self._rows_batch(order, index)
            return
        results: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for index in range(start, len(self)):
                    if stop.is_set():
                        return
                    results.put(self._rows_batch(order, index))
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

    def _rows_batch(self, order: np.ndarray, index: int) -> Batch:
        rows = order[index * self.batch_size : (index + 1) * self.batch_size][self.rows]
        keys = [self.keys[r] for r in rows]
        inputs, targets = shift(self.sequences[rows])
        return Batch(self.cache.get_batch(keys), inputs, targets, self.lengths[rows], keys)
