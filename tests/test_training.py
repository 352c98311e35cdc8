"""The training step: per-component freezing and learning rates, the two losses, overfitting
a tiny batch, and data parallelism giving the same losses on one and on two devices."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lensjax import Captioner, CaptionerConfig
from lensjax.data.tokenizer import EOS_ID
from lensjax.params import flat_params
from lensjax.train.step import Batch, Trainer, caption_loss, trim_padding

CFG = CaptionerConfig.from_preset("tiny", encoder=None, head=None)


def _params(seed=0, cfg=CFG):
    return {k: np.asarray(v) for k, v in flat_params(Captioner(cfg, rngs=nnx.Rngs(seed))).items()}


def _batch(rows=4, length=9, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, length - 1, rows).astype(np.int32)
    sequences = np.full((rows, length + 1), EOS_ID, np.int32)
    for row, n in enumerate(lengths):
        sequences[row, 1 : 1 + n] = rng.integers(0, 1000, n)
    features = rng.standard_normal((rows, 64, CFG.feature_dim)).astype(np.float32)
    return Batch(features, sequences[:, :-1], sequences[:, 1:], lengths)


def test_seed_loss_ignores_every_eos_and_eos_loss_trains_the_first():
    logits = np.zeros((1, 4, 50257), np.float32)
    logits[0, :, 7] = 5.0
    targets = np.array([[7, EOS_ID, EOS_ID, EOS_ID]])
    seed = float(caption_loss(logits, targets, np.array([1]), "seed"))
    eos = float(caption_loss(logits, targets, np.array([1]), "eos"))
    assert seed == pytest.approx(float(caption_loss(logits[:, :1], targets[:, :1],
                                                    np.array([1]), "seed")))
    assert eos > seed  # the EOS target at position 1 now counts, and it is unlikely


def test_phase_2c_changes_only_cross_attention():
    params = _params()
    trainer = Trainer(CFG, {"xattn": 1e-3})
    state = trainer.init(params)
    state, _ = trainer.step(state, _batch())
    after = trainer.params(state)
    for path, value in params.items():
        if path.startswith("gpt2.xattn."):
            assert not np.array_equal(after[path], value), path
        else:
            assert after[path].tobytes() == value.astype(np.float32).tobytes(), path
    # Frozen components keep no optimizer state; Adam keeps two moments per trained value.
    assert jax.tree.leaves(state.opt_state.inner_states["frozen"]) == []
    xattn_size = sum(v.size for p, v in params.items() if p.startswith("gpt2.xattn."))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * xattn_size


def test_phase_2b_components_move_at_their_own_learning_rates():
    cfg = CaptionerConfig.from_preset("tiny", encoder=None, head=None, mode="prepend")
    params = _params(cfg=cfg)
    trainer = Trainer(cfg, {"perceiver": 1e-5, "gpt2": 1e-6})
    state, _ = trainer.step(trainer.init(params), _batch())
    after = trainer.params(state)

    def largest_change(prefix):
        return max(float(np.abs(after[p] - params[p]).max()) for p in params
                   if p.startswith(prefix))

    # Adam's first update is lr * g / (|g| + eps): about lr wherever the gradient is not tiny
    # (float32 rounding of values near 1 adds up to half an ulp, 6e-8).
    perceiver, gpt2 = largest_change("perceiver."), largest_change("gpt2.h.")
    assert 0.5e-5 < perceiver <= 1e-5 + 1e-7
    assert 0.5e-6 < gpt2 <= 1e-6 + 1e-7
    assert 5 < perceiver / gpt2 < 20
    assert largest_change("gpt2.xattn.") == 0.0 and largest_change("gpt2.wte") == 0.0


def test_unknown_component_and_another_familys_component_are_refused():
    with pytest.raises(ValueError, match="unknown component"):
        Trainer(CFG, {"decodr": 1e-4}).init(_params())
    with pytest.raises(ValueError, match="this model has no decoder to train; its components: "
                                         "perceiver, xattn, lm, gpt2"):
        Trainer(CFG, {"decoder": 1e-4}).init(_params())  # a v3a component


def test_tiny_model_overfits_a_tiny_batch():
    trainer = Trainer(CFG, {k: 3e-3 for k in ("perceiver", "gpt2", "xattn", "lm")})
    state = trainer.init(_params())
    batch = _batch(rows=4, seed=1)
    losses = []
    for _ in range(300):
        state, metrics = trainer.step(state, batch)
        losses.append(metrics["loss"])
    # Dropout stays on and Adam at 3e-3 spikes once the loss is near zero (single steps at
    # 0.2-0.6 after it reached 0.02), so the last step alone says little: the loss must have
    # come down from chance to near zero, and stay low most of the last 100 steps.
    assert losses[0] > 5 and min(losses) < 0.03
    assert np.median(losses[-100:]) < 0.1


def test_one_and_two_devices_give_the_same_losses_with_and_without_gathered_rows():
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import itertools, jax, json, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from flax import nnx
        from lensjax import Captioner, CaptionerConfig
        from lensjax.params import flat_params
        from lensjax.train.step import Trainer, data_mesh
        from test_training import CFG, _batch
        assert len(jax.devices()) == 2
        params = {k: np.asarray(v) for k, v in
                  flat_params(Captioner(CFG, rngs=nnx.Rngs(0))).items()}
        curves = []
        # loss_rows 24: the output layer runs on 24 of the 32-36 positions where they fit
        for devices, rows in itertools.product((jax.devices()[:1], jax.devices()), (None, 24)):
            trainer = Trainer(CFG, {"perceiver": 1e-3, "xattn": 1e-3, "gpt2": 1e-4},
                              mesh=data_mesh(devices), loss_rows=rows)
            state = trainer.init(params)
            losses = []
            for step in range(10):
                state, metrics = trainer.step(state, _batch(rows=4, seed=step))
                losses.append(metrics["loss"])
            curves.append(losses)
        print(json.dumps(curves))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, *others = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    for other in others:  # two devices, and each with the output layer on gathered rows
        np.testing.assert_allclose(one, other, atol=1e-5, rtol=0)
    assert one[-1] < one[0]


def _loss_and_grads(trainer, params, batch, key):
    import jax.numpy as jnp

    from lensjax.optim import labels_for, split_trainable

    trainable, frozen = split_trainable({p: jnp.asarray(v) for p, v in params.items()},
                                        labels_for(params, trainer.learning_rates))
    batch = Batch(*(np.asarray(x) for x in batch))
    return jax.jit(jax.value_and_grad(trainer._loss_fn))(trainable, frozen, batch, key)


def test_remat_recomputes_the_same_loss_and_gradients_with_dropout_on():
    params, batch, key = _params(), _batch(), jax.random.key(3)
    rates = {k: 1e-3 for k in ("perceiver", "gpt2", "xattn", "lm")}
    plain = _loss_and_grads(Trainer(CFG, rates), params, batch, key)
    remat = _loss_and_grads(Trainer(CFG, rates, remat=True), params, batch, key)
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for path in plain[1]:
        np.testing.assert_allclose(plain[1][path], remat[1][path], rtol=1e-4, atol=1e-7,
                                   err_msg=path)
    # The jitted remat step really is checkpointed: the recomputation in its backward pass is
    # fenced by optimization barriers (one per block), which the plain step does not have.
    def barriers(trainer):
        state = trainer.init(params)
        return trainer._step.lower(state, trainer.shard_batch(batch)).as_text().count(
            "optimization_barrier")

    assert barriers(Trainer(CFG, rates)) == 0
    assert barriers(Trainer(CFG, rates, remat=True)) >= CFG.gpt2.n_layer


@pytest.mark.parametrize("mode", ["seed", "eos"])
def test_trimmed_padding_gives_the_loss_and_gradients_of_the_whole_batch(mode):
    batch = _batch(rows=3, length=30, seed=4)._replace(lengths=np.array([3, 9, 5], np.int32))
    batch.targets[:, 9:] = EOS_ID  # the longest caption is 9 tokens: positions 0..9 count
    trimmed = trim_padding(batch, mode)
    assert trimmed.inputs.shape == trimmed.targets.shape == (3, 16)  # 10 rounded up to 8s
    np.testing.assert_array_equal(trimmed.inputs, batch.inputs[:, :16])
    assert trim_padding(batch, mode, bucket=64).inputs.shape == (3, 30)  # never longer
    params = _params()
    rates = {k: 1e-3 for k in ("perceiver", "gpt2", "xattn", "lm")}
    trainer = Trainer(CFG, rates, loss=mode)
    whole = _loss_and_grads(trainer, params, batch, None)
    cut = _loss_and_grads(trainer, params, trimmed, None)
    np.testing.assert_allclose(cut[0], whole[0], rtol=1e-6)
    for path in whole[1]:
        np.testing.assert_allclose(cut[1][path], whole[1][path], rtol=1e-4, atol=1e-7,
                                   err_msg=path)
    assert trainer.shard_batch(batch).inputs.shape == (3, 16)  # what every step does


def test_every_block_output_stays_a_fusion_boundary_in_the_compiled_step():
    """XLA:CPU would otherwise recompute the residual stream of all earlier blocks inside
    each block's weight-gradient operand (`fusion_fence`)."""
    trainer = Trainer(CFG, {"gpt2": 1e-3})
    state = trainer.init(_params())
    compiled = trainer._step.lower(state, trainer.shard_batch(_batch())).compile().as_text()
    assert compiled.count(" conditional(") >= 2 * CFG.gpt2.n_layer  # forward and backward


def test_bfloat16_mixed_precision_keeps_float32_params_and_a_close_loss():
    params, batch = _params(), _batch()
    rates = {"perceiver": 1e-3, "xattn": 1e-3}
    f32 = Trainer(CFG, rates)
    bf16 = Trainer(CFG, rates, dtype="bfloat16")
    s32, s16 = f32.init(params), bf16.init(params)
    assert f32.eval_loss(s32, batch) == pytest.approx(bf16.eval_loss(s16, batch), rel=2e-2)
    s16, metrics = bf16.step(s16, batch)
    assert np.isfinite(metrics["loss"])
    assert {v.dtype for v in jax.tree.leaves((s16.trainable, s16.frozen, s16.opt_state))
            if v.ndim} == {np.dtype(np.float32)}


def test_training_from_pixels_gives_the_encoder_gradients_and_checkpoints_its_stages():
    cfg = CaptionerConfig.from_preset("tiny", image_size=32)
    params = _params(cfg=cfg)
    images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    batch = _batch()._replace(features=images)
    rates = {"encoder": 1e-3, "encoder_head": 1e-3, "perceiver": 1e-3}
    trainer = Trainer(cfg, rates, from_pixels=True, remat=True)
    _, grads = _loss_and_grads(trainer, params, batch, jax.random.key(1))
    assert {p.split(".")[0] for p in grads} == {"encoder", "encoder_head", "perceiver"}
    assert all(np.abs(np.asarray(g)).max() > 0 for p, g in grads.items()
               if p.endswith("conv_dw.kernel"))
    state = trainer.init(params)
    text = trainer._step.lower(state, trainer.shard_batch(batch)).as_text()
    # One barrier per recomputed GPT-2 block and per encoder stage.
    assert text.count("optimization_barrier") >= cfg.gpt2.n_layer + len(cfg.encoder.depths)
    with pytest.raises(ValueError, match="image encoder"):
        Trainer(CFG, rates, from_pixels=True)


def test_encoder_remat_recomputes_the_same_gradients():
    import jax.numpy as jnp

    from lensjax.models.convnext import ConvNeXt, ConvNeXtConfig

    encoder = ConvNeXt(ConvNeXtConfig.tiny(), rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)

    def grads(remat):
        loss = lambda m: sum(jnp.sum(jnp.sin(o)) for o in m(images, remat=remat))  # noqa: E731
        return nnx.state(nnx.jit(nnx.grad(loss))(encoder))

    plain, remat = grads(False), grads(True)
    for (path, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(remat),
                                 strict=True):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-5, err_msg=str(path))
