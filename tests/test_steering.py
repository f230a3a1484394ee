"""Per-request activation steering (model/steering.py) in process, on a tiny random
Hugging Face checkpoint: a steered row matches a transformers forward with the same vector
added by a forward hook on the same weights; the other rows of its batch are bitwise equal
to an engine without steering; bad entries name the field; no compilation per request."""

import numpy as np
import pytest
import torch

from sampling.params import SamplingParams
from serving.engine.device import compile_count
from tests.hf_models import save_hf_model

LAYER, SCALE = 0, 4.0
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 42, 7, 99], [3, 8, 250, 11], [61, 2, 2, 9, 30, 77]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from serving.local import LocalModel
    path = tmp_path_factory.mktemp("qwen2")
    hf = save_hf_model("qwen2", path, seed=3)
    vec = np.random.default_rng(0).normal(size=hf.config.hidden_size).astype(np.float32)
    steered = LocalModel(str(path), max_slots=4, max_len=64, dtype="float32",
                         steering_vectors={"v": vec})
    plain = LocalModel(str(path), max_slots=4, max_len=64, dtype="float32")
    return hf, vec, steered, plain


def _hf_greedy(hf, prompt, vec, steps):
    """transformers' own greedy loop with `SCALE * vec` added to layer LAYER's output."""
    add = torch.tensor(SCALE * vec)

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + add,) + tuple(output[1:])
        return output + add

    handle = hf.model.layers[LAYER].register_forward_hook(hook)
    try:
        seq, lps = list(prompt), []
        with torch.no_grad():
            for _ in range(steps):
                lp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, -1], -1)
                tok = int(lp.argmax())
                lps.append(float(lp[tok]))
                seq.append(tok)
    finally:
        handle.remove()
    return seq[len(prompt):], lps


def test_steered_row_matches_transformers_hook_others_bitwise(models):
    hf, vec, steered, plain = models
    spec = [{"layer": LAYER, "name": "v", "scale": SCALE}]
    out = steered.generate(PROMPTS, GREEDY, steering=[None, spec, None])
    ref = plain.generate(PROMPTS, GREEDY)
    for i in (0, 2):     # rows that did not ask: bitwise what an unsteered engine gives
        assert out[i].token_ids == ref[i].token_ids
        assert out[i].logprobs == ref[i].logprobs
    assert out[1].token_ids != ref[1].token_ids or out[1].logprobs != ref[1].logprobs
    hf_tokens, hf_lps = _hf_greedy(hf, PROMPTS[1], vec, 8)
    assert out[1].token_ids == hf_tokens
    np.testing.assert_allclose(out[1].logprobs, hf_lps, atol=1e-4)
    # the same vector sent inline gives the same result, and nothing compiles for it
    steered.generate([PROMPTS[1]], GREEDY)         # compiles the batch-1 programs
    before = compile_count()
    inline = steered.generate([PROMPTS[1]], GREEDY,
                              steering=[{"layer": LAYER, "vector": vec.tolist(), "scale": SCALE}])
    assert inline[0].token_ids == out[1].token_ids
    assert compile_count() == before


@pytest.mark.parametrize("entry, field", [
    ({"layer": 9, "name": "v"}, r"steering\[0\]\.layer"),
    ({"layer": 0, "vector": [1.0, 2.0]}, r"steering\[0\]\.vector"),
    ({"layer": 0, "name": "nope"}, r"steering\[0\]\.name"),
    ({"layer": 0, "name": "v", "scale": float("nan")}, r"steering\[0\]\.scale"),
    ({"layer": 0, "name": "v", "vector": [0.0]}, r"steering\[0\]"),
    ({"layer": 0, "name": "v", "bogus": 1}, r"steering\[0\]\.bogus"),
])
def test_bad_entries_name_the_field(models, entry, field):
    steered = models[2]
    with pytest.raises(ValueError, match=field):
        steered.generate([PROMPTS[0]], GREEDY, steering=[entry])


def test_plain_engine_refuses_steering(models):
    with pytest.raises(ValueError, match="steering"):
        models[3].generate([PROMPTS[0]], GREEDY, steering=[{"layer": 0, "name": "v"}])
