"""Beam search equals transformers' `generate(num_beams=...)` on the same random weights:
the returned beams' tokens, their order and their scores, and with logprobs each token's
logprob (transformers' transition scores).

The stop id is a token the model actually produces early (found by a greedy run), so
beams finish at different lengths and the finished-hypotheses bookkeeping is exercised,
not only the max-length path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampling.params import SamplingParams
from tests.hf_models import save_hf_model

PROMPT = [5, 17, 42, 7, 99, 3]
MAX_NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from checkpoints.loader import load_model
    from serving.beam_search import BeamSearcher
    path = tmp_path_factory.mktemp("qwen2_beam")
    hf = save_hf_model("qwen2", path, seed=5)
    config, params, _ = load_model(str(path), dtype="float32")
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    eos = greedy[2]                       # the greedy path stops at its third token
    return hf, BeamSearcher(config, params, max_len=64, stop_ids=[eos]), eos


def _hf_beams(hf, eos, width, n, length_penalty, early_stopping):
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), num_beams=width, num_return_sequences=n,
                          do_sample=False, length_penalty=length_penalty,
                          early_stopping=early_stopping, max_new_tokens=MAX_NEW,
                          eos_token_id=eos, pad_token_id=eos, return_dict_in_generate=True,
                          output_scores=True)
    beams = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        gen = seq[len(PROMPT):].tolist()
        if eos in gen:                     # HF pads after the stop token
            gen = gen[:gen.index(eos) + 1]
        beams.append((gen, float(score)))
    return beams


@pytest.mark.parametrize("width,n,length_penalty,early_stopping", [
    (4, 4, 1.0, False),
    (3, 2, 0.0, True),
    (5, 3, -0.5, False),
])
def test_beams_equal_transformers(models, width, n, length_penalty, early_stopping):
    hf, searcher, eos = models
    sampling = SamplingParams.from_dict(dict(
        use_beam_search=True, n=n, best_of=width if width != n else None,
        length_penalty=length_penalty, early_stopping=early_stopping, max_tokens=MAX_NEW,
        temperature=0.0))
    ours = searcher.run(PROMPT, sampling)
    ref = _hf_beams(hf, eos, width, n, length_penalty, early_stopping)
    assert [b.token_ids for b in ours] == [r[0] for r in ref]
    np.testing.assert_allclose([b.score for b in ours], [r[1] for r in ref], atol=1e-4)
    for b in ours:                         # the score is the penalised cumulative logprob
        assert b.score == pytest.approx(b.cumulative_logprob / len(b.token_ids) ** length_penalty,
                                        abs=1e-4)
        assert b.finish_reason == ("stop" if b.token_ids[-1] == eos else "length")
    assert any(b.finish_reason == "stop" for b in ours) or length_penalty > 0


def test_beam_logprobs_equal_transformers(models):
    """With logprobs, each returned beam's per-token logprobs are transformers' transition
    scores of that sequence (compute_transition_scores with its beam_indices)."""
    hf, searcher, eos = models
    sampling = SamplingParams.from_dict(dict(use_beam_search=True, n=2, best_of=3,
                                             max_tokens=MAX_NEW, logprobs=True, top_logprobs=2))
    ours = searcher.run(PROMPT, sampling)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), num_beams=3, num_return_sequences=2,
                          do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                          pad_token_id=eos, return_dict_in_generate=True, output_scores=True)
        trans = hf.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    for b, row in zip(ours, trans):
        n = len(b.token_ids)
        lps = [x[0] for x in b.logprobs]
        np.testing.assert_allclose(lps, row[:n].numpy(), atol=1e-4)
        assert sum(lps) == pytest.approx(b.cumulative_logprob, abs=1e-4)
        for t, (lp, rank, ids, tops) in zip(b.token_ids, b.logprobs):
            assert len(ids) == 2 and tops[0] >= tops[1] and tops[0] >= lp
            assert (rank == 1) == (ids[0] == t)


@pytest.mark.parametrize("fields,name", [
    ({"use_beam_search": True, "n": 17}, "n"),
    ({"use_beam_search": True, "top_p": 0.9}, "top_p"),
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "logprobs_mode": "processed"}, "logprobs_mode"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"use_beam_search": True, "length_penalty": float("nan")}, "length_penalty"),
])
def test_bad_beam_requests_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(fields)
