"""A checkpoint whose vocabulary is padded past its tokenizer (real Qwen checkpoints carry
151936 rows for ~151665 tokens) never samples an id the tokenizer does not have.

logit_bias pushes a padded id far above every real one: without the engine's token limit it
is drawn every time (the check that this test can fail), with it never."""

import numpy as np

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from serving.engine.device import DeviceEngine

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=5)
LIMIT = CFG.vocab_size - 7          # the tokenizer's size; ids >= LIMIT are padding
PADDED = CFG.vocab_size - 3


def draw(token_limit, params):
    eng = DeviceEngine(CFG, PARAMS, max_slots=1, max_len=32, prefill_buckets=(8,),
                       token_limit=token_limit)
    tokens = []
    for seed in range(4):
        out = eng.insert(0, np.asarray([5, 17, 99], np.int32), 0, params, seed).result()
        tokens.append(int(out.tokens[0]))
        for _ in range(3):
            tokens.append(int(eng.step().result().tokens[0]))
        eng.release(0)
    return tokens


def test_padded_ids_are_never_sampled():
    for params in (SamplingParams(temperature=1.0, logit_bias={PADDED: 100.0}),
                   SamplingParams(temperature=0.0, logit_bias={PADDED: 100.0})):
        assert set(draw(None, params)) == {PADDED}
        got = draw(LIMIT, params)
        assert max(got) < LIMIT, got
