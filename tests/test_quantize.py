"""Weight-only int8 (model/quantize.py): exact round-trip bounds, logits within the stated
tolerance of float32 on the bundled model, and the engine path through `bench decode`."""

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.loader import load_model
from model.decoder import forward, init_cache
from model.quantize import Int8Weight, quantize_array, quantized_bytes

# the documented bound (docs/speed.md, "int8"): max |logit error| <= 8% of the logits' std
LOGIT_TOLERANCE = 0.08


def test_quantize_array_is_per_output_channel_and_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 3, 5)).astype(np.float32) * np.arange(1, 16)[None, None, :5]
    w[:, 1, 2] = 0.0                                    # an all-zero channel stays zero
    q = quantize_array(w, (0,))
    # rows: one output channel per row, contiguous along the input axis
    assert q.q.dtype == jnp.int8 and q.q.shape == (15, 16) and q.scale.shape == (15, 1)
    back = np.asarray(q.dequantize(jnp.float32))
    assert back.shape == w.shape
    step = np.asarray(q.scale).reshape(1, 3, 5)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    assert np.all(back[:, 1, 2] == 0.0)
    assert np.all(np.abs(np.asarray(q.q)).max(axis=1) == np.where(
        np.abs(w).reshape(16, 15).max(0) > 0, 127, 0))  # each channel uses the full range
    # several input axes and a trailing one (the o projection, the tied embedding)
    for shape, axes in (((2, 3, 4, 6), (0, 1, 2)), ((7, 5), (1,))):
        v = rng.standard_normal(shape).astype(np.float32)
        qv = quantize_array(v, axes)
        k = int(np.prod([shape[i] for i in axes]))
        assert qv.q.shape == (v.size // k, k)
        assert np.abs(np.asarray(qv.dequantize(jnp.float32)) - v).max() <= \
            np.asarray(qv.scale).max() / 2 + 1e-7


def test_int8_logits_within_tolerance_of_float32():
    config, params, _ = load_model("default", dtype="float32")
    _, qparams, _ = load_model("default", dtype="float32", quantize="int8")
    leaves = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, Int8Weight))
    assert sum(isinstance(x, Int8Weight) for x in leaves) == 4 * config.num_layers + 1
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 24)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    run = jax.jit(lambda p: forward(config, p, init_cache(config, 2, 32), tokens, positions)[0])
    ref, got = np.asarray(run(params)), np.asarray(run(qparams))
    err = np.abs(ref - got).max() / ref.std()
    assert 0 < err <= LOGIT_TOLERANCE, err
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_int8_reads_about_a_quarter_of_the_weight_bytes():
    from model.config import named_config
    from model.decoder import init_params
    from model.quantize import quantize_params
    from serving.bench_decode import param_bytes_per_token

    config = named_config("tiny", dtype="float32")
    params = init_params(config)
    qparams = quantize_params(config, params)
    nbytes = param_bytes_per_token(config, qparams)        # what `bench decode` reports
    assert nbytes == quantized_bytes(config, params) < 0.3 * param_bytes_per_token(config, params)


def test_quantize_flag_reaches_the_engine_command():
    from serving.cli import build_parser
    from serving.serve import engine_command

    for argv in (["engine"], ["generate", "--prompt", "hi"]):
        args = build_parser(argv[0]).parse_args(argv + ["--quantize", "int8"])
        assert args.quantize == "int8"
    assert build_parser().parse_args(["bench", "decode", "--config", "tiny", "--quantize",
                                      "int8"]).quantize == "int8"
    args = build_parser("serve").parse_args(["serve", "--quantize", "int8"])
    cmd = engine_command(args)
    assert cmd[cmd.index("--quantize") + 1] == "int8"
