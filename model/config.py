"""Model configuration: one frozen dataclass for every supported decoder family.

The Llama family and its relatives differ only in a handful of switches (biases, q/k
norms, RoPE scaling, sliding windows, tied embeddings), so one config with explicit
switches beats a class per family. `from_hf` reads a Hugging Face config.json dict and
refuses anything it cannot represent exactly, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import jax

# Hugging Face `model_type` / architecture names we accept, mapped to our family name.
_HF_FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


def default_dtype() -> str:
    """float32 on CPU (XLA's bfloat16 on CPU is many times slower), bfloat16 elsewhere."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str = "llama"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("default",) | ("linear", factor) |
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple = ("default",)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # one flag per layer: does the sliding window apply to it (None: every layer when
    # sliding_window is set)
    sliding_layers: tuple | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling[0] not in ("default", "linear", "llama3"):
            raise ValueError(f"ModelConfig.rope_scaling: unsupported type {self.rope_scaling[0]!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or self.sliding_layers[layer]:
            return self.sliding_window
        return None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        o = self.num_heads * self.head_dim * d
        per_layer = qkv + o + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.o_bias:
            per_layer += d
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    # -- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
        d = dict(d)
        for key in ("rope_scaling", "sliding_layers", "eos_token_ids"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict, dtype: str | None = None, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict; unsupported features raise ValueError."""
        model_type = hf.get("model_type")
        if model_type not in _HF_FAMILIES:
            archs = hf.get("architectures")
            raise ValueError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(architectures={archs}); supported: {sorted(_HF_FAMILIES)}")
        family = _HF_FAMILIES[model_type]

        def need(key):
            if key not in hf or hf[key] is None:
                raise ValueError(f"{source}: missing required field {key!r}")
            return hf[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hidden // heads
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: unsupported hidden_act {act!r} (only silu)")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")

        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type == "default":
            scaling = ("default",)
        elif rope_type == "linear":
            scaling = ("linear", float(rope["factor"]))
        elif rope_type == "llama3":
            scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        else:
            raise ValueError(f"{source}: unsupported rope type {rope_type!r}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor is not supported")

        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = True if family == "qwen2" else attention_bias
        o_bias = False if family == "qwen2" else attention_bias

        sliding_window = None
        sliding_layers = None
        layer_types = hf.get("layer_types")
        if family == "mistral":
            sliding_window = hf.get("sliding_window")
        elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            sliding_window = hf.get("sliding_window")
        if layer_types and sliding_window is not None:
            sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
            if not any(sliding_layers):
                sliding_window, sliding_layers = None, None

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            family=family,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=family == "qwen3",
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype or default_dtype(),
        )

    @classmethod
    def from_hf_file(cls, path: str, dtype: str | None = None) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf(json.load(f), dtype=dtype, source=os.fspath(path))


# Named configurations for benchmarks and tests (random weights).
NAMED_CONFIGS = {
    # ~100M parameters in the Qwen3 layout (the decode benchmark's reference model).
    "qwen3-100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                       family="qwen3", qk_norm=True, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1000000.0),
    # A tiny model for fast tests.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, family="llama",
                 max_position_embeddings=512),
}


def named_config(name: str, dtype: str | None = None) -> ModelConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return ModelConfig(**NAMED_CONFIGS[name], dtype=dtype or default_dtype())
