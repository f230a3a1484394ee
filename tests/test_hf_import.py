"""Parity with Hugging Face transformers on imported checkpoints of every family.

Random-weight models are saved with `save_pretrained` and imported by our loader; the
forward, the cached decode and greedy generation must match transformers (float32).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints.hf import load_hf
from checkpoints.loader import load_model
from model.decoder import forward, init_cache
from tests.hf_models import FAMILIES, save_hf_model

IDS = np.random.default_rng(0).integers(0, 320, size=(2, 14))


def _forward(cfg):
    return jax.jit(lambda p, c, t, q: forward(cfg, p, c, t, q), donate_argnums=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_decode_and_greedy_match_transformers(family, tmp_path):
    hf_model = save_hf_model(family, tmp_path, seed=1)
    cfg, params = load_hf(str(tmp_path), dtype="float32")
    with torch.no_grad():
        ref = hf_model(torch.tensor(IDS)).logits.numpy()
    f = _forward(cfg)
    logits, _ = f(params, init_cache(cfg, 2, 32), jnp.asarray(IDS),
                  jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)

    cache = init_cache(cfg, 2, 32)
    steps = []
    for t in range(IDS.shape[1]):
        step, cache = f(params, cache, jnp.asarray(IDS[:, t:t + 1]), jnp.full((2, 1), t))
        steps.append(np.asarray(step[:, 0]))
    np.testing.assert_allclose(np.stack(steps, 1), ref, atol=1e-4, rtol=0)

    prompt = IDS[:1, :6]
    hf_seq = list(prompt[0])  # transformers' own greedy loop (generate() would mask EOS)
    with torch.no_grad():
        for _ in range(8):
            hf_seq.append(int(hf_model(torch.tensor([hf_seq])).logits[0, -1].argmax()))
    hf_out = hf_seq[6:]
    seq = list(prompt[0])
    cache = init_cache(cfg, 1, 32)
    logits, cache = f(params, cache, jnp.asarray([seq]), jnp.arange(len(seq))[None])
    ours = []
    for _ in range(8):
        tok = int(jnp.argmax(logits[0, -1]))
        ours.append(tok)
        logits, cache = f(params, cache, jnp.asarray([[tok]]), jnp.full((1, 1), len(seq)))
        seq.append(tok)
    assert ours == hf_out


def test_sharded_index_and_bf16_checkpoints(tmp_path):
    hf_model = save_hf_model("qwen2", tmp_path / "sharded", seed=2, max_shard_size="60KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg, params = load_hf(str(tmp_path / "sharded"), dtype="float32")
    with torch.no_grad():
        ref = hf_model(torch.tensor(IDS)).logits.numpy()
    logits, _ = _forward(cfg)(params, init_cache(cfg, 2, 32), jnp.asarray(IDS),
                              jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)

    bf = save_hf_model("llama3", tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    cfg, params = load_hf(str(tmp_path / "bf16"), dtype="float32")
    emb = bf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]), emb)


def test_loader_reads_hf_and_names_bad_inputs(tmp_path):
    save_hf_model("llama3", tmp_path / "ok", seed=4)
    cfg, _, model_dir = load_model(str(tmp_path / "ok"), dtype="float32")
    assert cfg.family == "llama" and model_dir == str(tmp_path / "ok")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a supported checkpoint"):
        load_model(str(empty))
    with pytest.raises(ValueError, match="no such directory"):
        load_model(str(tmp_path / "nope"))

    arch = tmp_path / "arch"
    save_hf_model("llama3", arch, seed=4)
    cfg_json = json.loads((arch / "config.json").read_text())
    cfg_json["model_type"] = "gpt_neox"
    (arch / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt_neox"):
        load_model(str(arch))

    from safetensors.numpy import load_file, save_file
    missing = tmp_path / "missing"
    save_hf_model("qwen2", missing, seed=5)
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(missing))

    shape = tmp_path / "shape"
    save_hf_model("qwen2", shape, seed=5)
    tensors = load_file(str(shape / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, str(shape / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.self_attn\.o_proj"):
        load_model(str(shape))

    garbage = tmp_path / "garbage"
    save_hf_model("qwen2", garbage, seed=5)
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(str(garbage))


def test_convert_cli_writes_an_orbax_checkpoint_equal_to_the_import(tmp_path):
    from serving.cli import main

    save_hf_model("qwen3", tmp_path / "hf", seed=6)
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out"),
                 "--dtype", "float32"]) == 0
    assert os.path.isfile(tmp_path / "out" / "tokenizer_config.json")
    cfg_a, params_a, _ = load_model(str(tmp_path / "hf"), dtype="float32")
    cfg_b, params_b, _ = load_model(str(tmp_path / "out"))
    assert cfg_a == cfg_b
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["convert", "--hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
