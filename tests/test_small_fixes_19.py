"""Issue 19's small fixes, against real servers (tiny model) with the official SDKs:

- `GET /v1/models` with an `anthropic-version` header answers in Anthropic's shape, so
  `anthropic.Anthropic().models.list()` / `.retrieve()` parse to the SDK's types;
  without the header it stays OpenAI's list.
- chat `logprobs.content` has no entry for the stop token that ended the reply (OpenAI's
  behaviour); the legacy completions route keeps it.
- optax is the `train` extra's: nothing that serves imports it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.http_fixtures import API_KEY, ROOT, start_servers

EOS = 1     # "</s>" of the tiny tokenizer (tests/http_fixtures.py)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield from start_servers(tmp_path_factory)


def test_anthropic_models_list_parses_to_its_types(servers):
    import anthropic
    from anthropic.types import ModelInfo
    client = anthropic.Anthropic(base_url=servers.base_url, api_key=API_KEY, max_retries=0)
    page = client.models.list()
    assert page.data and all(isinstance(m, ModelInfo) for m in page.data)
    first = page.data[0]
    assert first.type == "model" and first.display_name == first.id
    assert first.created_at.tzinfo is not None
    assert page.has_more is False and page.first_id == first.id
    one = client.models.retrieve(first.id)
    assert isinstance(one, ModelInfo) and one.id == first.id


def test_openai_models_list_unchanged(servers):
    from openai import OpenAI
    client = OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)
    models = client.models.list().data
    assert models and models[0].object == "model" and isinstance(models[0].created, int)


def test_chat_logprobs_have_no_stop_token_entry(servers):
    from openai import OpenAI
    client = OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)
    # the stop token forced after one ordinary token: finish_reason "stop"
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        logprobs=True, top_logprobs=2, logit_bias={str(EOS): 100}, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert len(choice.logprobs.content) == reply.usage.completion_tokens - 1
    assert all(e.token != "</s>" for e in choice.logprobs.content)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        logprobs=True, logit_bias={str(EOS): 100}, temperature=0, stream=True)
    entries = [e for c in stream for ch in c.choices if ch.logprobs and ch.logprobs.content
               for e in ch.logprobs.content]
    assert all(e.token != "</s>" for e in entries)
    # the legacy route keeps it
    legacy = client.completions.create(model="tiny", prompt="hi", max_tokens=8, logprobs=1,
                                       logit_bias={str(EOS): 100}, temperature=0)
    assert legacy.choices[0].finish_reason == "stop"
    assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens


def test_serving_does_not_import_optax():
    code = ("import sys, serving.engine.main, serving.http.app, serving.serve, "
            "serving.generate, checkpoints.loader, checkpoints.train_default; "
            "print('optax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
