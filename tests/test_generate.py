"""Decoding: the cached while-loop against re-running the model on the whole prefix, beam search
against a plain-Python transcription of LensToWords' procedure, and the sampling contracts."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from lensjax.api import CaptionModel
from lensjax.generate import EOS_ID, PERIOD_ID, DecodeOptions, bucket_sizes, is_degenerate, row_keys
from lensjax.params import build_captioner


def _features(model: CaptionModel, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 64, model.config.feature_dim)).astype(np.float32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def seed_beam_search(model, features, width, max_steps, alpha, min_new=0):
    """LensToWords' beam search as SEED.md describes it, one image, whole prefix re-run."""
    beams, completed = [([EOS_ID], 0.0)], []
    for step in range(max_steps):
        candidates = []
        for seq, score in beams:
            logits = np.asarray(model.logits(features[None], np.array([seq])))[0, -1]
            logp = _log_softmax(logits.astype(np.float64))
            if step < min_new:
                logp[[0, EOS_ID]] = -np.inf
            for token in np.argsort(-logp, kind="stable")[:width]:
                candidates.append((seq + [int(token)], score + float(logp[token])))
        candidates.sort(key=lambda c: c[1] / len(c[0]) ** alpha, reverse=True)
        beams = []
        for seq, score in candidates:
            if seq[-1] == EOS_ID:
                completed.append((seq, score))
            else:
                beams.append((seq, score))
            if len(beams) == width:
                break
    completed += beams
    return max(completed, key=lambda c: c[1] / len(c[0]) ** alpha)


def _normalised_score(model, features, tokens, alpha):
    """score / len(seq) ** alpha of `tokens` (without BOS; EOS-terminated if shorter)."""
    body = [int(t) for t in tokens if t != EOS_ID]
    seq = [EOS_ID, *body] + ([EOS_ID] if len(body) < len(tokens) else [])
    logits = np.asarray(model.logits(features[None], np.array([seq[:-1]])))[0]
    score = sum(_log_softmax(logits[i].astype(np.float64))[seq[i + 1]]
                for i in range(len(seq) - 1))
    return score / len(seq) ** alpha


def _uncached_greedy(model, features, steps):
    ids = np.full((len(features), 1), EOS_ID, np.int32)
    for _ in range(steps):
        nxt = np.asarray(model.logits(features, ids))[:, -1].argmax(-1)
        ids = np.concatenate([ids, nxt[:, None].astype(np.int32)], axis=1)
    return ids[:, 1:]


@pytest.mark.parametrize("preset", ["tiny", pytest.param("v3b", marks=pytest.mark.slow)])
def test_cached_greedy_equals_rerunning_the_whole_prefix(preset, imported):
    model = imported(preset)
    features = _features(model, 2)
    tokens = model.generate(features, method="greedy", max_new_tokens=10, min_new_tokens=10)
    np.testing.assert_array_equal(tokens, _uncached_greedy(model, features, 10))


def test_prepend_mode_cached_greedy_equals_uncached(imported):
    model = imported("tiny")
    prepend = CaptionModel(build_captioner(
        dataclasses.replace(model.config, mode="prepend"), model.params))
    features = _features(model, 2, seed=1)
    tokens = prepend.generate(features, method="greedy", max_new_tokens=8, min_new_tokens=8)
    np.testing.assert_array_equal(tokens, _uncached_greedy(prepend, features, 8))


@pytest.mark.parametrize("min_new", [0, 4])
def test_beam_search_equals_lenstowords_procedure_on_tiny(imported, min_new):
    model = imported("tiny")
    features = _features(model, 3, seed=2)
    tokens = model.generate(features, method="beam", beam_width=3, max_new_tokens=6,
                            min_new_tokens=min_new, alpha=0.7)
    for row in range(3):
        seq, _ = seed_beam_search(model, features[row], 3, 6, 0.7, min_new)
        expected = [t for t in seq[1:] if t != EOS_ID]
        assert [int(t) for t in tokens[row] if t != EOS_ID] == expected


@pytest.mark.slow
def test_beam_search_scores_at_least_the_procedure_on_full_model(imported):
    model = imported("v3b")
    features = _features(model, 2, seed=3)
    tokens = model.generate(features, method="beam", beam_width=3, max_new_tokens=4)
    for row in range(2):
        seq, score = seed_beam_search(model, features[row], 3, 4, 0.7)
        ours = _normalised_score(model, features[row], tokens[row], 0.7)
        assert ours >= score / len(seq) ** 0.7 - 1e-4


def test_topk_only_emits_tokens_from_the_top_k(imported):
    model = imported("tiny")
    features = _features(model, 4, seed=4)
    tokens = model.generate(features, method="topk", top_k=5, temperature=1.5,
                            max_new_tokens=6, min_new_tokens=6, retry=False)
    for row in range(4):
        ids = np.array([[EOS_ID, *tokens[row]]])
        logits = np.asarray(model.logits(features[row : row + 1], ids))[0]
        for step, token in enumerate(tokens[row]):
            masked = logits[step].copy()
            masked[[0, EOS_ID]] = -np.inf
            assert token in np.argsort(-masked)[:5]


def test_same_seed_same_captions_other_seed_other_captions(imported):
    model = imported("tiny")
    features = _features(model, 4, seed=5)
    options = dict(method="topk", max_new_tokens=8, min_new_tokens=8, retry=False)
    first = model.generate(features, seed=1, **options)
    np.testing.assert_array_equal(first, model.generate(features, seed=1, **options))
    assert not np.array_equal(first, model.generate(features, seed=2, **options))


def test_captions_do_not_depend_on_batch_size_or_position(imported):
    model = imported("tiny")
    features = _features(model, 5, seed=6)
    options = dict(method="topk", max_new_tokens=8, seed=3, retry=False)
    together = model.generate(features, batch_size=8, **options)
    in_pairs = model.generate(features, batch_size=2, **options)
    reversed_rows = model.generate(features[::-1], batch_size=4, **options)[::-1]
    np.testing.assert_array_equal(together, in_pairs)
    np.testing.assert_array_equal(together, reversed_rows)


@pytest.mark.parametrize("method", ["greedy", "topk", "beam"])
def test_min_new_tokens_defers_every_stop_rule(imported, method):
    model = imported("tiny")
    tokens = model.generate(_features(model, 3, seed=7), method=method, max_new_tokens=9,
                            min_new_tokens=9, beam_width=2)
    assert (tokens != EOS_ID).all()
    assert (tokens != 0).all()


def test_greedy_stops_after_three_equal_tokens(imported):
    model = imported("tiny")
    tokens = model.generate(_features(model, 6, seed=8), method="greedy", max_new_tokens=20)
    stopped_by_repeat = 0
    for row in tokens:
        body = [int(t) for t in row if t != EOS_ID]
        assert all(not (body[i] == body[i + 1] == body[i + 2]) for i in range(len(body) - 3))
        if len(body) >= 3 and body[-1] == body[-2] == body[-3]:
            stopped_by_repeat += 1
            assert (row[len(body):] == EOS_ID).all()
    assert stopped_by_repeat >= 2


def test_sampling_stops_after_a_period_only_when_asked(imported):
    model = imported("tiny")
    params = dict(model.params)
    embedding = np.asarray(params["gpt2.wte.embedding"]).copy()
    embedding[PERIOD_ID] *= 50.0
    params["gpt2.wte.embedding"] = embedding
    # The final hidden state becomes a constant along wte['.']: '.' wins every argmax.
    params["gpt2.ln_f.scale"] = np.zeros_like(params["gpt2.ln_f.scale"])
    params["gpt2.ln_f.bias"] = embedding[PERIOD_ID]
    dotty = CaptionModel(build_captioner(model.config, params))
    features = _features(model, 2, seed=9)
    stops = dotty.generate(features, method="greedy", max_new_tokens=5)
    assert stops[:, 0].tolist() == [PERIOD_ID] * 2 and (stops[:, 1:] == EOS_ID).all()
    goes_on = dotty.generate(features, method="greedy", max_new_tokens=5,
                             stop_at_period=False, stop_on_repeat=False)
    assert (goes_on == PERIOD_ID).all()


@pytest.mark.parametrize("method", ["greedy", "topk", "beam"])
def test_37_images_at_batch_32_compile_at_most_two_programs(imported, method):
    model = CaptionModel(imported("tiny").module)
    model.generate(_features(model, 37, seed=10), method=method, max_new_tokens=3,
                   beam_width=2, retry=False)
    assert model._decode._cache_size() <= 2
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]


def test_degenerate_caption_rule():
    words = frozenset({"a", "dog", "the"})
    assert not is_degenerate(" A", "A dog runs on the grass", words)
    assert is_degenerate(" Xq", "Xq dog", words)
    assert is_degenerate(" A", "A DOGS run", words)
    assert not is_degenerate(" A", "A DOG run", words)
    assert is_degenerate(" a", "a dog dog dog", words)


def test_retry_resamples_rejected_rows(imported, monkeypatch):
    model = CaptionModel(imported("tiny").module)
    features = _features(model, 3, seed=11)
    options = dict(method="topk", max_new_tokens=6, min_new_tokens=6, seed=4)
    plain = model.generate(features, retry=False, **options)
    model._words = frozenset()  # every caption is rejected: all rows resampled 5 times
    resampled = model.generate(features, retry=True, **options)
    assert not np.array_equal(plain, resampled)
    monkeypatch.setattr("lensjax.api.is_degenerate", lambda *args: False)
    np.testing.assert_array_equal(model.generate(features, retry=True, **options), plain)


def _while_bodies(hlo: str) -> dict[str, tuple[list[str], str]]:
    """{body computation name: (shapes of the loop's f32 arrays of rank >= 4, body text)} of
    every while loop in a compiled module's text."""
    computations = {block.split(" ", 1)[0].lstrip("%"): block
                    for block in re.split(r"\n(?=\S)", hlo)}
    loops = {}
    for match in re.finditer(r"= \((.*?)\) while\(.*?body=%?([\w.-]+)", hlo):
        shapes = re.findall(r"f32\[\d+(?:,\d+){3,}\]", match.group(1))
        loops[match.group(2)] = (shapes, computations.get(match.group(2), ""))
    return loops


@pytest.mark.parametrize("method", ["topk", "beam"])
def test_decoding_loop_copies_no_cache(imported, method):
    # With a cache laid out (B, H, D, W, max_len), XLA:CPU copied every layer's keys and values
    # three times per step inside the loop (7% of a v3b step); (B, H, D, W * max_len) has none.
    model = CaptionModel(imported("tiny").module)
    options = DecodeOptions(method=method, max_new_tokens=6, beam_width=3)
    features = jnp.asarray(_features(model, 4))
    keys = row_keys(0, np.arange(4, dtype=np.uint64), 0)
    compiled = model._decode.lower(model.state, features, keys, jnp.float32(0.7),
                                   jnp.float32(0.7), options=options)
    loops = _while_bodies(compiled.compile().as_text())
    decoding = [(shapes, body) for shapes, body in loops.values() if len(shapes) >= 4]
    assert decoding, "no decoding loop found in the compiled program"
    for shapes, body in decoding:
        copied = set(re.findall(r"(f32\[[\d,]+\])\{[\d,]*\} copy\(", body))
        assert not copied & set(shapes), f"the loop copies {sorted(copied & set(shapes))}"
