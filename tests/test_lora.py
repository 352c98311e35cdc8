"""LoRA adapters: PEFT's scaling, frozen base weights, targets, the unmerged training form
equal to the merged weights, and checkpoints that store adapters apart and load merged."""

import jax
import numpy as np
import pytest
from flax import nnx

from lensjax import Captioner, CaptionerConfig, lora
from lensjax.checkpoint import load_checkpoint, save_checkpoint
from lensjax.params import build_captioner, flat_params
from lensjax.train.step import Trainer
from tests.test_training import _batch

CFG = CaptionerConfig.from_preset("tiny", encoder=None, head=None)
SPEC = lora.LoRASpec(rank=4, alpha=8, targets=("c_attn", "c_fc", "xattn"))


def _params(seed=0):
    return {k: np.asarray(v) for k, v in flat_params(Captioner(CFG, rngs=nnx.Rngs(seed))).items()}


def _trained(steps=3):
    trainer = Trainer(CFG, {"lora": 1e-2}, lora_spec=SPEC)
    state = trainer.init(_params())
    for seed in range(steps):
        state, _ = trainer.step(state, _batch(seed=seed))
    return trainer, state


def test_parse_spec_reads_rank_alpha_and_a_target_list():
    spec = lora.parse_spec("rank=4,alpha=8,targets=c_attn,c_fc", ("c_proj",))
    assert spec == lora.LoRASpec(4, 8.0, ("c_attn", "c_fc"))
    assert spec.scale == 2.0
    assert lora.parse_spec("", ("c_proj",)) == lora.LoRASpec(8, 16.0, ("c_proj",))
    for bad in ("rank=0", "alpha=-1", "rank=x", "size=3", "c_attn", "targets="):
        with pytest.raises(ValueError):
            lora.parse_spec(bad, ("c_proj",))


def test_targets_are_path_components_outside_the_encoder_and_must_match():
    params = _params()
    layers = lora.target_layers(params, SPEC)
    assert layers and all(".c_attn" in p or ".c_fc" in p or ".xattn." in p for p in layers)
    assert {p for p in layers if ".c_attn" in p} == {f"gpt2.h.{i}.attn.c_attn"
                                                     for i in range(CFG.gpt2.n_layer)}
    with pytest.raises(ValueError, match="c_atn"):
        lora.target_layers(params, lora.LoRASpec(targets=("c_atn",)))


def test_v3a_default_targets_are_its_decoder_attention():
    from lensjax.models.families import FAMILIES, preset_config
    from lensjax.params import abstract_params

    spec = lora.LoRASpec(targets=FAMILIES["v3a"].lora_targets)
    layers = lora.target_layers(abstract_params(preset_config("v3a-tiny")), spec)
    assert layers and all(p.startswith("decoder.layers.") and
                          (".self_attn." in p or ".multihead_attn." in p) for p in layers)


def test_fresh_adapters_change_nothing():
    params = _params()
    adapters = lora.init_adapters(params, SPEC)
    a, b = lora.adapter_paths("gpt2.h.0.attn.c_attn")
    assert adapters[a].shape == (CFG.gpt2.n_embd, 4) and not np.all(adapters[a] == 0)
    assert adapters[b].shape == (4, 3 * CFG.gpt2.n_embd) and np.all(adapters[b] == 0)
    merged = lora.merge(params, adapters, SPEC)
    assert all(np.array_equal(merged[p], params[p]) for p in params)


def test_training_moves_only_adapters_and_keeps_no_state_for_the_base():
    params = _params()
    trainer, state = _trained()
    after = trainer.params(state)
    for path, value in params.items():  # base weights bit-identical
        assert after[path].tobytes() == value.tobytes(), path
    b = lora.adapter_paths("gpt2.h.0.attn.c_attn")[1]
    assert np.abs(after[b]).max() > 0
    assert jax.tree.leaves(state.opt_state.inner_states["frozen"]) == []
    adapter_size = sum(v.size for p, v in after.items() if p.startswith("lora."))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * adapter_size + 8


def test_merged_weight_is_w_plus_alpha_over_rank_a_b_and_gives_the_adapter_logits():
    trainer, state = _trained()
    everything = trainer.params(state)
    base, adapters = lora.split_adapters(everything)
    merged = lora.merge(base, adapters, SPEC)
    a, b = lora.adapter_paths("gpt2.h.1.mlp.c_fc")
    expected = base["gpt2.h.1.mlp.c_fc.kernel"] + (8 / 4) * adapters[a] @ adapters[b]
    np.testing.assert_allclose(merged["gpt2.h.1.mlp.c_fc.kernel"], expected, rtol=1e-6)
    # The trainer's unmerged form (x W + s (x A) B) and the merged model agree.
    batch = _batch(seed=7)
    with jax.default_matmul_precision("highest"):
        adapter_loss = trainer.eval_loss(state, batch)
        plain = Trainer(CFG, {"xattn": 1e-3})
        merged_loss = plain.eval_loss(plain.init(merged), batch)
    assert adapter_loss == pytest.approx(merged_loss, rel=1e-5)


def test_checkpoint_stores_adapters_apart_and_loads_merged(tmp_path):
    trainer, state = _trained()
    everything = trainer.params(state)
    meta = {"family": "v3b", "config": CFG.to_dict(), "lora": SPEC.to_dict()}
    save_checkpoint(tmp_path / "ckpt", everything, meta)
    assert (tmp_path / "ckpt" / lora.TREE).is_dir()
    separate, metadata = load_checkpoint(tmp_path / "ckpt", merge_lora=False)
    assert set(separate) == set(everything)
    assert all(np.array_equal(separate[p], everything[p]) for p in everything)
    merged, _ = load_checkpoint(tmp_path / "ckpt")
    assert not any(p.startswith("lora.") for p in merged)
    base, adapters = lora.split_adapters(everything)
    want = lora.merge(base, adapters, SPEC)
    assert all(np.array_equal(merged[p], want[p]) for p in want)
    build_captioner(CFG, merged)  # a complete model
    from lensjax import load_pretrained

    model = load_pretrained(tmp_path / "ckpt")  # merged; saved again as a plain checkpoint
    model.save(tmp_path / "again")
    again, meta = load_checkpoint(tmp_path / "again")
    assert meta["lora_merged"] == SPEC.to_dict() and "lora" not in meta
    assert all(np.array_equal(again[p], want[p]) for p in want)
    with pytest.raises(ValueError, match="go together"):
        save_checkpoint(tmp_path / "bad", everything, {"config": CFG.to_dict()})
