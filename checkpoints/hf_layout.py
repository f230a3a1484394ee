"""Where each of our parameters comes from in a Hugging Face checkpoint.

Our decoder fuses q/k/v into one [embed, kv_heads, q_per_kv + 2, head_dim] weight and
gate/up into one [embed, 2, mlp] weight (see model/decoder.py). This module is the one
place that knows how the Hugging Face tensors (Linear weights stored [out, in]) map onto
that layout: `param_sources` lists, for every leaf of our parameter tree, the HF tensor
names it is built from and a numpy function that builds it. Loaders call it per leaf (or
per shard of a leaf), so no second full copy of the model is ever held on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from model.config import ModelConfig


@dataclass(frozen=True)
class Source:
    """A parameter leaf: built by `build(*hf_tensors)` from the named HF tensors."""

    names: tuple[str, ...]
    build: Callable[..., np.ndarray]


def _qkv(cfg: ModelConfig):
    kvh, g, hd = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim

    def build(q, k, v):
        # weights [out, in] -> [in, kv_heads, group, head_dim]; biases [out] -> [kv_heads, group, head_dim]
        if q.ndim == 2:
            lead = (q.shape[1],)
            q, k, v = q.T, k.T, v.T
        else:
            lead = ()
        q = q.reshape(lead + (kvh, g, hd))
        k = k.reshape(lead + (kvh, 1, hd))
        v = v.reshape(lead + (kvh, 1, hd))
        return np.concatenate([q, k, v], axis=-2)

    return build


def param_sources(cfg: ModelConfig) -> dict:
    """Nested dict shaped like our params, with a `Source` at every leaf."""
    kvh, g, hd = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    tree: dict = {"embed": Source(("model.embed_tokens.weight",), lambda w: w)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        attn = {
            "qkv": Source((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), _qkv(cfg)),
            "o": Source((a + "o_proj.weight",), lambda w: w.T.reshape(kvh, g, hd, w.shape[0])),
        }
        if cfg.qkv_bias:
            attn["qkv_bias"] = Source((a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                                      _qkv(cfg))
        if cfg.o_bias:
            attn["o_bias"] = Source((a + "o_proj.bias",), lambda b: b)
        if cfg.qk_norm:
            attn["q_norm"] = {"scale": Source((a + "q_norm.weight",), lambda w: w)}
            attn["k_norm"] = {"scale": Source((a + "k_norm.weight",), lambda w: w)}
        m = p + "mlp."
        tree[f"layer_{i}"] = {
            "attn_norm": {"scale": Source((p + "input_layernorm.weight",), lambda w: w)},
            "attn": attn,
            "mlp_norm": {"scale": Source((p + "post_attention_layernorm.weight",), lambda w: w)},
            "mlp": {
                "gate_up": Source((m + "gate_proj.weight", m + "up_proj.weight"),
                                  lambda gw, uw: np.stack([gw.T, uw.T], axis=1)),
                "down": Source((m + "down_proj.weight",), lambda w: w.T),
            },
        }
    tree["final_norm"] = {"scale": Source(("model.norm.weight",), lambda w: w)}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = Source(("lm_head.weight",), lambda w: w.T)
    return tree
