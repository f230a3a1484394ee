"""In-process batched generation (LocalModel), scoring, and the analysis metrics."""

import numpy as np
import pytest
import torch

from sampling.analysis import distinct_n, mean_entropy, repetition_rate, report
from sampling.params import SamplingParams
from serving.local import LocalModel
from tests.hf_models import save_hf_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf = save_hf_model("llama3", path, seed=11)
    return LocalModel(str(path), max_slots=3, max_len=64, dtype="float32"), hf


def hf_greedy(hf, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_more_prompts_than_slots_all_finish_with_the_right_tokens(setup):
    lm, hf = setup
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = lm.generate(prompts, greedy)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == 5
        assert out.token_ids == hf_greedy(hf, prompt, 5)


def test_seeded_rows_are_reproducible_and_independent_of_the_batch(setup):
    lm, _ = setup
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, ignore_eos=True)
    alone = lm.generate([[1, 2, 3]], p, seeds=[42])[0]
    mixed = lm.generate([[9, 9], [1, 2, 3], [5]],
                        [SamplingParams(temperature=0.3, max_tokens=3, ignore_eos=True), p,
                         SamplingParams(temperature=2.0, top_k=5, max_tokens=12, ignore_eos=True)],
                        seeds=[1, 42, 2])
    assert mixed[1].token_ids == alone.token_ids
    other = lm.generate([[1, 2, 3]], p, seeds=[43])[0]
    assert other.token_ids != alone.token_ids
    assert all(np.isfinite(alone.entropies)) and len(alone.entropies) == 8


def test_score_matches_transformers(setup):
    lm, hf = setup
    prompt, cont = [5, 6, 7], [8, 9, 10, 11]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + cont])).logits[0], -1)
    ref = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
    assert lm.score(prompt, cont) == pytest.approx(ref, abs=1e-3)


def test_bad_params_are_value_errors(setup):
    lm, _ = setup
    with pytest.raises(ValueError, match="top_p"):
        lm.generate([[1]], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="one SamplingParams per prompt"):
        lm.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="exceeds max_len"):
        lm.generate([list(range(70))], SamplingParams(max_tokens=2))


def test_metrics_on_known_sequences():
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1]], 2) == 0.0
    assert repetition_rate([1, 2, 1, 2, 3]) == pytest.approx(2 / 5)
    assert repetition_rate([1, 2, 1, 2, 3], n=2) == pytest.approx(1 / 4)
    assert mean_entropy([[1.0, 3.0], [2.0]]) == 2.0
    r = report("x", [[1, 2], [1, 3]], [[1.0, 1.0], [2.0, 2.0]], [-2.0, -4.0])
    assert r.distinct_1 == 0.75 and r.log_likelihood == -1.5 and r.mean_length == 2
    with pytest.raises(ValueError):
        distinct_n([[1]], 0)
