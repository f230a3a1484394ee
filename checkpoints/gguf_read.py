"""Import a GGUF file (llama.cpp's format): config, weights and tokenizer from one file.

The file is read with the `gguf` package, llama.cpp's own reader (memory-mapped, so a
tensor's bytes are read only when its parameter is built). The config comes from the
`{arch}.*` metadata (llama, mistral, qwen2, qwen3), the weights are dequantized to float32
by checkpoints/gguf_dequant.py, renamed to the Hugging Face names and placed through the
same per-leaf path as safetensors (checkpoints/hf.py). llama.cpp's converter permutes the
rows of Llama/Mistral Q and K weights (it pairs rotary halves differently); that is undone
here. The tokenizer is rebuilt from `tokenizer.ggml.*` by checkpoints/gguf_tokenizer.py.
Every error names the file, and the tensor where there is one.
"""

from __future__ import annotations

import os
import re

import numpy as np

from checkpoints import gguf_dequant
from model.config import ModelConfig, default_dtype

# general.architecture -> our family
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
# the families whose Q/K rows llama.cpp's converter permutes
_PERMUTED = ("llama", "mistral")

_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def is_gguf(path: str) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: not one we know)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (rows [heads, 2, half] -> [heads, half, 2])."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """Metadata and tensors of one GGUF file, with errors that name it."""

    def __init__(self, path: str):
        self.path = path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such GGUF file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (the file starts with {magic!r}, "
                             f"not the magic b'GGUF')")
        import gguf
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except Exception as e:   # the reader raises bare ValueError/IndexError/KeyError
            raise ValueError(f"{path}: not a readable GGUF file "
                             f"({_reader_error(path, e)})") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        size = os.path.getsize(path)
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ValueError(f"{path}: truncated: tensor {t.name} needs bytes up to {end} "
                                 f"but the file has {size} (an incomplete download?)")

    def get(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if arch is None:
            raise ValueError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, in numpy (Hugging Face) axis order."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in gguf_dequant.BLOCKS:
            raise ValueError(f"{self.path}: tensor {name} has quantization type {kind}, which "
                             f"flaxserve does not dequantize (supported: "
                             f"{', '.join(gguf_dequant.SUPPORTED)})")
        shape = tuple(int(d) for d in reversed(t.shape))     # ggml lists the fastest axis first
        n = int(np.prod(shape))
        block = gguf_dequant.BLOCKS[kind][0]
        if shape[-1] % block:
            raise ValueError(f"{self.path}: tensor {name}: row length {shape[-1]} is not a "
                             f"multiple of the {kind} block size {block}")
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        if raw.size != gguf_dequant.nbytes(kind, n):
            raise ValueError(f"{self.path}: tensor {name}: {raw.size} bytes of data, "
                             f"{gguf_dequant.nbytes(kind, n)} expected for {kind} {list(shape)}")
        return gguf_dequant.dequantize(raw, kind, n).reshape(shape)


def _reader_error(path: str, e: Exception) -> str:
    """What went wrong inside gguf's reader, in words, naming the tensor where we can: an
    unknown type id, or data that runs past the end of the file."""
    text = str(e) or type(e).__name__
    infos = _walk_header(path)
    if infos is None:
        return text
    import gguf
    known = {int(t) for t in gguf.GGMLQuantizationType}
    size = os.path.getsize(path)
    for name, dims, ttype, end in infos:
        if ttype not in known:
            return f"tensor {name} has an unknown quantization type id {ttype} ({text})"
    for name, dims, ttype, end in infos:
        if end > size:
            return (f"truncated: tensor {name} needs bytes up to {end} but the file has {size} "
                    f"(an incomplete download?)")
    return text


def _walk_header(path: str):
    """[(name, dims, type id, end offset of its data)] read from the header by hand, or None
    if the header itself is cut short (only for error messages)."""
    import struct

    import gguf
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    try:
        with open(path, "rb") as f:
            data = f.read(256 << 20)
        pos = 8
        n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
        pos += 16
        alignment = 32

        def value(vtype: int):
            nonlocal pos
            if vtype == 8:
                (n,) = struct.unpack_from("<Q", data, pos)
                pos += 8 + n
                return None
            if vtype == 9:
                etype, n = struct.unpack_from("<IQ", data, pos)
                pos += 12
                for _ in range(n):
                    value(etype)
                return None
            out = int.from_bytes(data[pos:pos + sizes[vtype]], "little")
            pos += sizes[vtype]
            return out

        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", data, pos)
            key = data[pos + 8:pos + 8 + n]
            pos += 8 + n
            (vtype,) = struct.unpack_from("<I", data, pos)
            pos += 4
            v = value(vtype)
            if key == b"general.alignment" and v:
                alignment = v
        infos = []
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", data, pos)
            name = data[pos + 8:pos + 8 + n].decode("utf-8", "replace")
            pos += 8 + n
            (ndims,) = struct.unpack_from("<I", data, pos)
            dims = struct.unpack_from(f"<{ndims}Q", data, pos + 4)
            pos += 4 + 8 * ndims
            ttype, offset = struct.unpack_from("<IQ", data, pos)
            pos += 12
            infos.append([name, dims, ttype, offset])
        if pos > len(data):
            return None
        start = -(-pos // alignment) * alignment
        for info in infos:
            block, type_size = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(info[2]),
                                                         (1, 0)) \
                if info[2] in {int(t) for t in gguf.GGMLQuantizationType} else (1, 0)
            count = 1
            for d in info[1]:
                count *= d
            info[3] = start + info[3] + count // block * type_size
        return [tuple(i) for i in infos]
    except (struct.error, KeyError, IndexError, ValueError):
        return None


def read_config(f: GGUFFile, dtype: str | None = None) -> ModelConfig:
    """Our config from the `{arch}.*` metadata and the tensors present."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: unsupported architecture {arch!r} (general.architecture); "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    family = ARCHITECTURES[arch]

    def need(key):
        value = f.get(f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{f.path}: missing metadata {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = f.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ValueError(f"{f.path}: {arch}.attention.head_count_kv varies per layer, "
                         f"which flaxserve does not support")
    head_dim = f.get(f"{arch}.attention.key_length") or f.get(f"{arch}.rope.dimension_count") \
        or hidden // heads
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = f.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in f.tensors:
        vocab = int(f.tensors["token_embd.weight"].shape[1])
    if vocab is None:
        raise ValueError(f"{f.path}: cannot tell the vocabulary size (no {arch}.vocab_size, "
                         f"no tokenizer.ggml.tokens)")

    theta = float(f.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = ("default",)
    rope_type = f.get(f"{arch}.rope.scaling.type")
    if rope_type == "linear":
        scaling = ("linear", float(need("rope.scaling.factor")))
    elif rope_type not in (None, "none"):
        raise ValueError(f"{f.path}: unsupported rope scaling {rope_type!r} "
                         f"({arch}.rope.scaling.type)")
    if "rope_freqs.weight" in f.tensors:
        scaling = _llama3_scaling(f, theta, int(head_dim))

    eos = f.get("tokenizer.ggml.eos_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, f.get("tokenizer.ggml.eot_token_id"),
                                              f.get("tokenizer.ggml.eom_token_id"))
                                  if i is not None))
    window = f.get(f"{arch}.attention.sliding_window")
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(kv_heads), head_dim=int(head_dim), family=family,
        max_position_embeddings=int(f.get(f"{arch}.context_length", 4096)),
        rms_norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in f.tensors,
        qkv_bias="blk.0.attn_q.bias" in f.tensors,
        o_bias="blk.0.attn_output.bias" in f.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        sliding_window=int(window) if window and family == "mistral" else None,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        dtype=dtype or default_dtype(),
    )


def _llama3_scaling(f: GGUFFile, theta: float, head_dim: int) -> tuple:
    """Llama 3.1+ files store RoPE scaling as per-frequency divisors (rope_freqs.weight):
    recognise Meta's llama3 rule (low/high frequency factors 1 and 4, 8192 original
    positions) with the factor the divisors imply, or refuse."""
    got = f.tensor("rope_freqs.weight").reshape(-1)
    factor = float(got.max())
    low, high, orig = 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    want = np.where(wavelen < orig / high, 1.0,
                    np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    if want.shape != got.shape or not np.allclose(want, got, rtol=1e-3):
        raise ValueError(f"{f.path}: tensor rope_freqs.weight holds RoPE frequency factors "
                         f"that do not follow the llama3 rule; flaxserve cannot represent them")
    return ("llama3", factor, low, high, orig)


def load_gguf(path: str, mesh=None, dtype: str | None = None, progress=None):
    """(config, params) from a GGUF file, params placed on `mesh` in the config's dtype."""
    from checkpoints.hf import place_params

    f = GGUFFile(path)
    config = read_config(f, dtype)
    by_hf = {}
    for name in f.tensors:
        if name == "rope_freqs.weight":
            continue
        target = hf_name(name)
        if target is None:
            raise ValueError(f"{f.path}: tensor {name} is not part of a {f.architecture} "
                             f"decoder that flaxserve knows (a mixture-of-experts or "
                             f"multimodal file?)")
        by_hf[target] = name
    for name in by_hf.values():            # fail on a type we cannot read before any work
        kind = f.tensor_type(name)
        if kind not in gguf_dequant.BLOCKS:
            raise ValueError(f"{f.path}: tensor {name} has quantization type {kind}, which "
                             f"flaxserve does not dequantize (supported: "
                             f"{', '.join(gguf_dequant.SUPPORTED)})")
    permuted = config.family in _PERMUTED

    def get(hf: str) -> np.ndarray:
        if hf not in by_hf:
            raise ValueError(f"{f.path}: missing tensor {_gguf_name(hf)} (Hugging Face {hf})")
        w = f.tensor(by_hf[hf])
        if permuted and ".self_attn.q_proj." in hf:
            w = unpermute(w, config.num_heads)
        elif permuted and ".self_attn.k_proj." in hf:
            w = unpermute(w, config.num_kv_heads)
        return w

    return config, place_params(config, get, f.path, mesh=mesh, progress=progress)


def _gguf_name(hf: str) -> str:
    inverse = {v: k for k, v in _GLOBAL_TENSORS.items()}
    if hf in inverse:
        return inverse[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        for k, v in _LAYER_TENSORS.items():
            if v == m.group(2):
                return f"blk.{m.group(1)}.{k}"
    return hf


def count_leaves(path: str) -> int:
    from checkpoints.hf import count_leaves as count
    return count(read_config(GGUFFile(path)))
