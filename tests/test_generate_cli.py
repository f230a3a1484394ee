"""`flaxserve generate` as a user runs it: a real subprocess on a real checkpoint directory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.hf_models import save_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flaxserve(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = save_hf_model("qwen3", path, seed=9)
    return path, model


def test_greedy_json_with_logprobs_matches_transformers(model_dir):
    path, model = model_dir
    prompt = [3, 14, 15, 92, 65]
    proc = flaxserve("generate", "--model", str(path), "--prompt-ids", ",".join(map(str, prompt)),
                     "--max-tokens", "6", "--temperature", "0", "--logprobs", "3", "--json",
                     "--ignore-eos")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    seq = list(prompt)
    ref_lps = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([seq])).logits[0, -1]
            logp = torch.log_softmax(logits, -1)
            tok = int(logits.argmax())
            ref_lps.append((tok, float(logp[tok]), torch.topk(logp, 3)))
            seq.append(tok)
    assert out["token_ids"] == seq[len(prompt):]
    assert len(out["logprobs"]) == 6
    for entry, (tok, lp, top) in zip(out["logprobs"], ref_lps):
        assert entry["token_id"] == tok
        assert entry["logprob"] == pytest.approx(lp, abs=1e-4)
        assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]],
                                   top.values.numpy(), atol=1e-4)


def test_seeded_sampling_is_reproducible_and_seed_sensitive(model_dir):
    path, _ = model_dir
    args = ["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--max-tokens", "8",
            "--temperature", "1.0", "--top-k", "50", "--ignore-eos", "--json"]
    a = json.loads(flaxserve(*args, "--seed", "123").stdout)
    b = json.loads(flaxserve(*args, "--seed", "123").stdout)
    c = json.loads(flaxserve(*args, "--seed", "124").stdout)
    assert a["token_ids"] == b["token_ids"] and a["seed"] == 123
    assert a["token_ids"] != c["token_ids"]


@pytest.mark.parametrize("flag,value,name", [
    ("--top-p", "1.5", "top_p"), ("--temperature", "-1", "temperature"),
    ("--min-p", "2", "min_p"), ("--repetition-penalty", "0", "repetition_penalty"),
    ("--logit-bias", '{"5": 300}', "logit_bias"), ("--no-repeat-ngram-size", "-2",
                                                   "no_repeat_ngram_size"),
])
def test_invalid_sampling_flag_exits_nonzero_naming_it(model_dir, flag, value, name):
    path, _ = model_dir
    proc = flaxserve("generate", "--model", str(path), "--prompt-ids", "1,2", "--max-tokens",
                     "2", flag, value)
    assert proc.returncode != 0
    assert name in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_ids_outside_vocab_and_missing_model(model_dir, tmp_path):
    path, _ = model_dir
    proc = flaxserve("generate", "--model", str(path), "--prompt-ids", "1,99999", "--max-tokens", "2")
    assert proc.returncode == 2 and "outside the vocabulary" in proc.stderr
    proc = flaxserve("generate", "--model", str(tmp_path), "--prompt-ids", "1", "--max-tokens", "2")
    assert proc.returncode == 2 and "not a supported checkpoint" in proc.stderr
