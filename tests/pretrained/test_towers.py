"""`model.lm_pretrained` through the trainer: a Flamingo initialised on an HF LM reproduces that LM's logits."""

import jax
import numpy as np
import torch
import transformers

from flamingo_jax import sharding, train
from tests.configs import tiny_train_config


def test_trainer_init_loads_hf_lm_into_flamingo(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path)

    config = tiny_train_config()
    config.model.lm_pretrained = str(tmp_path)
    mcfg = train.validate(config)
    assert (mcfg.lm.num_layers, mcfg.lm.dim, mcfg.lm.kv_heads, mcfg.lm.vocab_size) == (3, 32, 2, 64)
    mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
    tr = train.build(config, mcfg, mesh)
    state, frozen = train.init_state(tr)

    # Frozen LM weights are HF's; the added token rows (trainable) start at the mean embedding.
    want_q = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy().T.reshape(32, 4, 8)
    np.testing.assert_allclose(np.asarray(frozen["lm"]["layers"]["attn"]["q"]["kernel"][1]), want_q, atol=1e-6)
    added = np.asarray(state["params"]["lm"]["embed"]["added"])
    np.testing.assert_allclose(added[0], hf.model.embed_tokens.weight.detach().numpy().mean(0), atol=1e-6)

    model = tr.parts.merge(state["params"], frozen)
    ids = np.random.default_rng(0).integers(0, 64, (2, 9))
    media = np.zeros((2, 1, 1, 32, 32, 3), np.uint8)
    got = np.asarray(model(media, ids))[..., :64]
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
