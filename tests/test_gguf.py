"""GGUF import on synthetic files written with gguf's own writer (no download needed).

- every quantization type we read: our dequantizer against `gguf.quants.dequantize`
  (the classic types quantized by `gguf.quants.quantize`; gguf's Python cannot quantize
  the K-quants, so those tensors are random blocks with finite float16 scales);
- tiny random models of each family written as llama.cpp writes them (Q/K rows permuted
  for llama/mistral): logits through our loader against transformers on the same weights;
- the dtype policy: BF16/F16 files load as float32 on CPU;
- bad files: one clear ValueError naming the file (and the tensor).
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from checkpoints.gguf_dequant import BLOCKS
from checkpoints.gguf_read import GGUFFile
from checkpoints.loader import load_model
from model.decoder import forward, init_cache
from tests.hf_models import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the float16 scales inside one block of each K-quant
_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXSERVE_MODELS", str(tmp_path / "cache"))


def _write(path, arch: str, tensors: dict, meta: dict | None = None) -> str:
    """A GGUF file: tensors {name: float array | (raw bytes, type)}, metadata {key: value}."""
    w = gguf.GGUFWriter(str(path), arch)
    typed = {"tokenizer.ggml.tokens": w.add_token_list,
             "tokenizer.ggml.scores": w.add_token_scores,
             "tokenizer.ggml.token_type": w.add_token_types}
    for key, value in (meta or {}).items():
        if key in typed:
            typed[key](value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _raw(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """The bytes of a [rows, cols] tensor of type `kind` (gguf's byte shape)."""
    if kind in QUANTIZABLE:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        return x if kind == "F32" else gguf.quants.quantize(x, T[kind])
    size, type_size = BLOCKS[kind]
    b = rng.integers(0, 256, (rows * cols // size, type_size), dtype=np.uint8)
    for off in _K_SCALES[kind]:
        scale = (rng.standard_normal(len(b)) * 0.05).astype("<f2")
        b[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, cols // size * type_size)


@pytest.mark.parametrize("kind", QUANTIZABLE + K_QUANTS)
def test_dequantize_matches_gguf_quants(kind, tmp_path):
    rng = np.random.default_rng(sum(map(ord, kind)))
    raw = _raw(kind, 4, 512, rng)
    path = _write(tmp_path / f"{kind}.gguf", "llama", {"w": (raw, T[kind])})
    f = GGUFFile(path)
    assert f.tensor_type("w") == kind
    ours = f.tensor("w")
    ref = gguf.quants.dequantize(np.asarray(f.tensors["w"].data), T[kind])
    assert ours.shape == (4, 512) and ours.dtype == np.float32
    assert np.all(np.isfinite(ref))
    np.testing.assert_array_equal(ours, ref)
    if kind in QUANTIZABLE[3:]:     # and the quantization is a real one: close to the input
        x = rng.standard_normal((4, 512)).astype(np.float32)
        back = gguf.quants.quantize(x, T[kind])
        p2 = _write(tmp_path / f"{kind}-b.gguf", "llama", {"w": (back, T[kind])})
        assert np.abs(GGUFFile(p2).tensor("w") - x).max() < 0.5


# -- tiny models of each family, as llama.cpp writes them ---------------------------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama Q/K rows."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_NAMES = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}


def write_model_gguf(path, family: str, model, dtype: str = "F32") -> str:
    cfg = model.config
    arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    meta = {f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.context_length": cfg.max_position_embeddings,
            f"{arch}.embedding_length": cfg.hidden_size,
            f"{arch}.feed_forward_length": cfg.intermediate_size,
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv,
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            f"{arch}.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
            f"{arch}.attention.key_length": head_dim,
            f"{arch}.attention.value_length": head_dim,
            f"{arch}.vocab_size": cfg.vocab_size}
    if family == "mistral":
        meta[f"{arch}.attention.sliding_window"] = cfg.sliding_window
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    permute = family in ("llama", "mistral")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind, n in (("q", heads), ("k", kv), ("v", None)):
            for suffix in ("weight", "bias"):
                name = f"{p}self_attn.{kind}_proj.{suffix}"
                if name in state:
                    w = state[name]
                    tensors[f"blk.{i}.attn_{kind}.{suffix}"] = \
                        _permute(w, n) if permute and n else w
        for hf, ours in _NAMES.items():
            if p + hf in state:
                tensors[f"blk.{i}.{ours}"] = state[p + hf]
    if dtype != "F32":
        tensors = {k: ((gguf.quants.quantize(v, T[dtype]), T[dtype]) if v.ndim == 2 else v)
                   for k, v in tensors.items()}
    return _write(path, arch, tensors, meta)


IDS = [[5, 17, 42, 99, 3, 250, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8]]


def _logits(config, params, ids):
    f = jax.jit(lambda p, c, t, q: forward(config, p, c, t, q))
    logits, _ = f(params, init_cache(config, len(ids), max(32, len(ids[0]))), jnp.asarray(ids),
                  jnp.broadcast_to(jnp.arange(len(ids[0])), (len(ids), len(ids[0]))))
    return np.asarray(logits)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_model_gguf_logits_match_transformers(family, tmp_path):
    extra = {"llama": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))}
    model = make_hf_model("llama3" if family == "llama" else family, **extra.get(family, {}))
    path = write_model_gguf(tmp_path / f"{family}.gguf", family, model)
    config, params, model_dir = load_model(path)
    assert config.family == family and config.dtype == "float32"
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert config.sliding_window == (6 if family == "mistral" else None)
    assert os.path.isdir(model_dir)             # a tokenizer dir, empty here (weights only)
    with torch.no_grad():
        ref = model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(_logits(config, params, IDS), ref, atol=1e-4, rtol=0)


def test_llama3_rope_freqs_are_recognised(tmp_path):
    """Llama 3.1+ files carry RoPE scaling as per-frequency divisors (rope_freqs.weight, as
    llama.cpp's converter computes them); we map them back to the llama3 rule."""
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    model = make_hf_model("llama3", rope_parameters=rope, head_dim=64, num_attention_heads=2,
                          num_key_value_heads=1, hidden_size=128, max_position_embeddings=131072)
    path = write_model_gguf(tmp_path / "plain.gguf", "llama", model)
    f = GGUFFile(path)
    tensors = {name: f.tensor(name) for name in f.tensors}
    freqs = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    factors = []
    for freq in freqs:                       # llama.cpp convert_hf_to_gguf.py's rule
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 32.0 + smooth))
    tensors["rope_freqs.weight"] = np.asarray(factors, np.float32)
    meta = {k: f.get(k) for k in f._reader.fields if k.startswith("llama.")}
    path = _write(tmp_path / "llama3.gguf", "llama", tensors, meta)
    config, params, _ = load_model(path)
    assert config.rope_scaling == ("llama3", 32.0, 1.0, 4.0, 8192)
    ids = [[(7 * i) % 300 for i in range(40)]]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(config, params, ids), ref, atol=1e-4, rtol=0)
    tensors["rope_freqs.weight"] = np.linspace(1, 3, 32).astype(np.float32)
    bad = _write(tmp_path / "odd.gguf", "llama", tensors, meta)
    with pytest.raises(ValueError, match=f"{bad}: tensor rope_freqs.weight .*llama3 rule"):
        load_model(bad)


def test_bf16_and_f16_files_load_as_float32_on_cpu(tmp_path):
    model = make_hf_model("qwen3")
    with torch.no_grad():
        ref = model(torch.tensor(IDS)).logits.numpy()
    for kind in ("BF16", "F16"):
        path = write_model_gguf(tmp_path / f"{kind}.gguf", "qwen3", model, dtype=kind)
        assert GGUFFile(path).tensor_type("blk.0.attn_q.weight") == kind
        config, params, _ = load_model(path)
        assert config.dtype == "float32"
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
        np.testing.assert_allclose(_logits(config, params, IDS), ref, atol=0.1)


def test_quantized_model_file_loads(tmp_path):
    """Q8_0 weights (embedding rows too) through the whole loader: close to the float model."""
    model = make_hf_model("qwen2")
    with torch.no_grad():
        ref = model(torch.tensor(IDS)).logits.numpy()
    path = write_model_gguf(tmp_path / "q8.gguf", "qwen2", model, dtype="Q8_0")
    config, params, _ = load_model(path)
    got = _logits(config, params, IDS)
    assert np.abs(got - ref).max() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_convert_gguf_to_orbax(tmp_path):
    model = make_hf_model("qwen3")
    path = write_model_gguf(tmp_path / "m.gguf", "qwen3", model)
    out = tmp_path / "orbax"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "serving.cli", "convert", "--gguf", path, "--out",
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    config, params, model_dir = load_model(str(out))
    assert config.family == "qwen3" and model_dir == str(out)
    with torch.no_grad():
        ref = model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(_logits(config, params, IDS), ref, atol=1e-4, rtol=0)


# -- bad files ------------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    return write_model_gguf(tmp_path / "good.gguf", "qwen3", make_hf_model("qwen3"))


def test_truncated_file_names_file_and_tensor(good_file, tmp_path):
    data = open(good_file, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 5000])
    with pytest.raises(ValueError) as e:
        load_model(str(cut))
    msg = str(e.value)
    assert str(cut) in msg and "truncated" in msg and "tensor blk." in msg
    cut.write_bytes(data[:100])                 # cut inside the header
    with pytest.raises(ValueError, match=f"{cut}: not a readable GGUF file"):
        load_model(str(cut))


def test_wrong_magic(good_file, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + open(good_file, "rb").read()[4:])
    with pytest.raises(ValueError, match=f"{bad}: not a GGUF file .*magic"):
        load_model(str(bad))


def test_unknown_architecture(tmp_path):
    path = _write(tmp_path / "m.gguf", "mamba", {"w": np.ones((4, 32), np.float32)},
                  {"mamba.block_count": 1})
    with pytest.raises(ValueError, match=f"{path}: unsupported architecture 'mamba'.*llama"):
        load_model(path)


def test_quant_type_we_do_not_read_names_the_tensor(good_file, tmp_path):
    """IQ4_NL is a type gguf knows and we do not dequantize."""
    f = GGUFFile(good_file)
    tensors = {name: f.tensor(name) for name in f.tensors}
    raw = np.zeros((tensors["blk.1.ffn_up.weight"].shape[0], 64 // 32 * 18), np.uint8)
    tensors["blk.1.ffn_up.weight"] = (raw, T.IQ4_NL)
    meta = {k: f.get(k) for k in f._reader.fields if k.startswith("qwen3.")}
    path = _write(tmp_path / "iq.gguf", "qwen3", tensors, meta)
    with pytest.raises(ValueError, match=f"{path}: tensor blk.1.ffn_up.weight has quantization "
                                         f"type IQ4_NL, which flaxserve does not dequantize"):
        load_model(path)


def test_unknown_type_id_names_the_tensor(good_file, tmp_path):
    """A type id no version of gguf knows (patched into the header)."""
    f = GGUFFile(good_file)
    t = f.tensors["blk.0.ffn_down.weight"]
    data = bytearray(open(good_file, "rb").read())
    name = t.name.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(t.tensor_type)
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "type250.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{bad}: .*tensor blk.0.ffn_down.weight has an "
                                         f"unknown quantization type"):
        load_model(str(bad))


def test_cli_reports_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "serving.cli", "generate", "--model", str(bad),
                        "--prompt-ids", "1,2", "--max-tokens", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"flaxserve: error: {bad}: not a GGUF file (the file starts with b'not ', not the "
        f"magic b'GGUF')")


# -- tokenizers: a sentencepiece-style vocabulary as a GGUF, and the bundled model's files ---------

DEFAULT_DIR = os.path.join(ROOT, "checkpoints", "default")
SP_TEXTS = ["Two plus two equals four", " leading space", "  two spaces", "a\n\nb\tc",
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<think>y</think> z",
            "héllo wörld 日本語 🙂 👨‍👩‍👧", "<s>bos</s>", "<unk>", "", "1234567890", "end. "]


def _sp_corpus(n: int = 300) -> list[str]:
    import random
    rng = random.Random(3)
    pieces = ["the", " cat", "  ", "\n", "é", "🙂", "<|im_end|>", "<s>", "</s>", "sat", " on",
              "mat.", "1234", "\t", "A", "   ", "\u00a0", "ß", "中文", "don't", "<think>"]
    return SP_TEXTS + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
                       for _ in range(n)]


def test_default_tokenizer_matches_transformers():
    """The bundled model's files say add_prefix_space false, so transformers' Llama tokenizer
    adds no '▁' before the first word: 7 tokens for this sentence on both sides."""
    from transformers import AutoTokenizer

    from checkpoints.tokenizer import load_tokenizer
    hf, ours = AutoTokenizer.from_pretrained(DEFAULT_DIR), load_tokenizer(DEFAULT_DIR)
    assert len(ours.encode("Two plus two equals four")) == 7
    for text in _sp_corpus():
        assert ours.encode(text) == hf(text).input_ids, text


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    """The bundled sentencepiece model written as llama.cpp writes a `llama` vocabulary
    (tokens, scores, types, no merges): ours and transformers' GGUF tokenizer agree."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    from checkpoints.gguf_tokenizer import tokenizer_dir
    from checkpoints.tokenizer import load_tokenizer
    proto = pb.ModelProto()
    proto.ParseFromString(open(os.path.join(DEFAULT_DIR, "tokenizer.model"), "rb").read())
    sp = spm.SentencePieceProcessor(model_file=os.path.join(DEFAULT_DIR, "tokenizer.model"))
    kinds = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}       # sentencepiece type -> llama.cpp type
    meta = {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [float(p.score) for p in proto.pieces],
            "tokenizer.ggml.token_type": [kinds[p.type] for p in proto.pieces],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    path = _write(tmp_path / "sp.gguf", "llama", {"w": np.ones((2, 32), np.float32)}, meta)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    ours = load_tokenizer(tokenizer_dir(GGUFFile(path)))
    assert ours.add_bos and ours.bos_id == sp.bos_id()      # llama files get BOS by default
    assert ours.chat_template == meta["tokenizer.chat_template"]
    # transformers' converter builds a LlamaTokenizer whose default eos "</s>" it adds as
    # token 4096 when the vocabulary has no "</s>" (this one ends turns with <|im_end|>):
    # an id outside the model. We do not copy that; texts with "</s>" are left out.
    assert hf.convert_tokens_to_ids("</s>") == 4096 and ours.token_to_id("</s>") is None
    for text in _sp_corpus():
        if "</s>" in text:
            continue
        ids = hf(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
