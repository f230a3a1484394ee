"""vLLM's request extensions as aliases of ours, with the openai SDK (extra_body) against a
tiny Hugging Face checkpoint served by `flaxserve engine` + gunicorn, transformers on the
same weights as the reference: `structured_outputs`, `return_token_ids`, `prompt_logprobs`
(vLLM's shape, equal to transformers' log-softmax and to model.scoring), `stream_options.
continuous_usage_stats`, `/tokenize`, `/detokenize`, `/version`, `/tokenizer_info`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import openai
import pytest
import requests
import torch

from tests.hf_models import save_hf_model
from tests.http_fixtures import API_KEY, ROOT, Servers, _env, build_tokenizer

PROMPT = "hello world, the quick brown fox"
_SCORE = r"""
import json, sys
from checkpoints.hf import load_hf
from model.scoring import prompt_logprobs
config, params = load_hf(sys.argv[1], dtype="float32")
lp, rank, _, _ = prompt_logprobs(config, params, json.loads(sys.argv[2]), 3)
print(json.dumps({"lp": [float(x) for x in lp], "rank": [int(x) for x in rank]}))
"""


def write_hf_model_dir(path):
    """A tiny random Qwen3 checkpoint with the tiny tokenizer beside it (an HF directory as
    a user has one); returns the transformers model, the reference."""
    tok = build_tokenizer()
    model = save_hf_model("qwen3", path, seed=3, vocab_size=len(tok),
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model, tok = write_hf_model_dir(root / "hf")
    s = Servers(root, [API_KEY], ["--max-slots", "4", "--max-model-len", "256"],
                model=str(root / "hf"), served_names=("tiny",))
    try:
        yield s, model, tok
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].base_url + "/v1", api_key=API_KEY, max_retries=0)


def _post(servers, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(servers.base_url + path, json=body, timeout=60, headers=headers)


def test_structured_outputs(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for so, check in (({"json": schema}, lambda t: jsonschema.validate(json.loads(t), schema)),
                      ({"regex": "[0-9]{3}"}, lambda t: re.fullmatch("[0-9]{3}", t)),
                      ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
                      ({"grammar": 'root ::= "a" [0-9]'}, lambda t: re.fullmatch("a[0-9]", t))):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, seed=1,
                                      extra_body={"structured_outputs": so})
        assert check(r.choices[0].text) is not False, (so, r.choices[0].text)
        c = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=24, seed=1,
            extra_body={"structured_outputs": so})
        assert check(c.choices[0].message.content) is not False
    for bad, param in (({"regex": "a", "choice": ["b"]}, "structured_outputs"),
                       ({"structural_tag": {}}, "structured_outputs.structural_tag")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2,
                                      extra_body={"structured_outputs": bad})
        assert e.value.body["param"] == param


def test_return_token_ids(client, served):
    servers, _, tok = served
    ids = tok.encode(PROMPT, add_special_tokens=False)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0].model_extra
    assert choice["prompt_token_ids"] == ids
    assert len(choice["token_ids"]) == r.usage.completion_tokens
    assert tok.decode(choice["token_ids"], skip_special_tokens=True) == r.choices[0].text
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=6,
                                              temperature=0, stream=True,
                                              extra_body={"return_token_ids": True}))
    got = [t for ch in streamed for c in ch.choices for t in (c.model_extra or {}).get(
        "token_ids") or []]
    assert got == choice["token_ids"]
    assert streamed[0].choices[0].model_extra["prompt_token_ids"] == ids
    messages = [{"role": "user", "content": "say hi"}]
    c = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                       temperature=0, extra_body={"return_token_ids": True})
    assert c.model_extra["prompt_token_ids"] == \
        _post(servers, "/tokenize", {"messages": messages}).json()["tokens"]
    assert len(c.choices[0].model_extra["token_ids"]) == c.usage.completion_tokens


def test_prompt_logprobs_equal_transformers(client, served):
    _, model, tok = served
    ids = tok.encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for body in ({"prompt": ids}, {"prompt": PROMPT}):
        r = client.completions.create(model="tiny", max_tokens=1,
                                      extra_body={"prompt_logprobs": 3}, **body)
        plp = r.choices[0].model_extra["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(ids)
        for i in range(1, len(ids)):
            ref = logp[i - 1]
            entry = plp[i]
            own = entry[str(ids[i])]
            assert own["logprob"] == pytest.approx(float(ref[ids[i]]), abs=1e-4)
            assert own["rank"] == 1 + int((ref > ref[ids[i]]).sum())
            assert own["decoded_token"] == tok.decode([ids[i]])
            top = torch.topk(ref, 3)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-4)
    # and to model.scoring (the engine's own scoring function, run in a child process)
    scored = json.loads(subprocess.run(
        [sys.executable, "-c", _SCORE, str(served[0].model_dir), json.dumps(ids)],
        capture_output=True, text=True, check=True, timeout=300, cwd=ROOT, env=_env()).stdout)
    for i in range(1, len(ids)):
        own = plp[i][str(ids[i])]
        assert own["logprob"] == pytest.approx(scored["lp"][i - 1], abs=1e-5)
        assert own["rank"] == scored["rank"][i - 1]
    chat = client.chat.completions.create(model="tiny", max_tokens=1,
                                          messages=[{"role": "user", "content": PROMPT}],
                                          extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == chat.usage.prompt_tokens
    assert all(len(e) == 1 for e in plp[1:])


def test_continuous_usage_stats(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices


def test_tokenize_detokenize_version(served):
    servers, _, tok = served
    r = _post(servers, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False,
                                     "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(PROMPT, add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert "".join(r["token_strs"]) == PROMPT
    back = _post(servers, "/detokenize", {"tokens": r["tokens"]}).json()
    assert back["prompt"] == PROMPT
    assert _post(servers, "/detokenize", {"tokens": [10 ** 6]}).status_code == 400
    assert _post(servers, "/tokenize", {"prompt": PROMPT}, key=None).status_code == 401
    v = requests.get(servers.base_url + "/version", timeout=10,
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert isinstance(v["version"], str) and v["version"]
    info = requests.get(servers.base_url + "/tokenizer_info", timeout=10,
                        headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token


def test_translate_maps_aliases_and_names_bad_keys():
    from serving.http.errors import APIError
    from serving.http.vllm_ext import translate
    body, opts = translate({"structured_outputs": {"regex": "a+"}, "return_token_ids": True,
                            "prompt_logprobs": 2,
                            "stream_options": {"continuous_usage_stats": True}})
    assert body["guided_regex"] == "a+" and "structured_outputs" not in body
    assert "return_token_ids" not in body and body["prompt_logprobs"] == 2
    assert opts.return_token_ids and opts.prompt_logprobs == 2 and opts.continuous_usage
    for bad, param in (({"structured_outputs": {"json": {}}, "guided_json": {}},
                        "structured_outputs"),
                       ({"return_token_ids": "yes"}, "return_token_ids"),
                       ({"prompt_logprobs": -1}, "prompt_logprobs"),
                       ({"stream_options": {"continuous_usage_stats": 1}},
                        "stream_options.continuous_usage_stats")):
        with pytest.raises(APIError) as e:
            translate(bad)
        assert e.value.param == param
