"""lm-evaluation-harness against our server, as researchers run it: the `lm_eval` command
with `local-completions` and `local-chat-completions`, on local tasks (task YAMLs written
here, pointing at tests/data/lm_eval/*.jsonl; the hub is never asked: HF_*_OFFLINE=1).

- loglikelihood (a multiple-choice task): every choice's log-likelihood equals
  transformers' on the same weights within 1e-4, with token-id prompts
  (`tokenized_requests=True`) and with string prompts (`tokenized_requests=False`);
- generate_until with 5 stop strings (plus the EOS lm_eval adds): the run ends, and each
  answer is the one our /v1/completions gives for the same request.
lm_eval lives in the `eval` extra (it pulls datasets, pandas, pyarrow, scikit-learn):
without it installed these tests are skipped, and say so.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from tests.http_fixtures import API_KEY, Servers
from tests.test_vllm_ext import write_hf_model_dir

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the `eval` extra")

DATA = Path(__file__).resolve().parent / "data" / "lm_eval"
STOPS = ["\n\n", "zzz", "qqq", ".", ";"]          # five, as the generate_until task
MAX_GEN = 8


def _task_yaml(name: str, data: str, **fields) -> str:
    head = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(DATA / data)}},
            "test_split": "test", "doc_to_text": "{{context}}", "target_delimiter": "",
            **fields}
    return json.dumps(head, indent=1)          # JSON is YAML


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "hf"
    model, tok = write_hf_model_dir(model_dir)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(_task_yaml(
        "flaxserve_tiny_mc", "tiny_mc.jsonl", output_type="multiple_choice",
        doc_to_choice="{{choices}}", doc_to_target="{{label}}",
        metric_list=[{"metric": "acc"}]))
    (tasks / "tiny_gen.yaml").write_text(_task_yaml(
        "flaxserve_tiny_gen", "tiny_gen.jsonl", output_type="generate_until",
        doc_to_target="{{target}}",
        generation_kwargs={"until": STOPS, "max_gen_toks": MAX_GEN, "do_sample": False},
        metric_list=[{"metric": "exact_match"}]))
    s = Servers(root, [API_KEY], ["--max-slots", "4", "--max-model-len", "256"],
                model=str(model_dir), served_names=("tiny",))
    try:
        yield s, model, tok, model_dir, tasks, root
    finally:
        s.close()


def _lm_eval(setup, kind: str, tasks: str, out: str, **args) -> list[dict]:
    servers, _, _, model_dir, task_dir, root = setup
    path = "/v1/chat/completions" if kind == "local-chat-completions" else "/v1/completions"
    model_args = {"model": "tiny", "base_url": servers.base_url + path, "max_length": 256,
                  "num_concurrent": 1, "max_retries": 1, **args}
    cmd = [sys.executable, "-m", "lm_eval", "--model", kind, "--model_args",
           ",".join(f"{k}={v}" for k, v in model_args.items()), "--tasks", tasks,
           "--include_path", str(task_dir), "--output_path", str(root / out),
           "--log_samples", "--batch_size", "1"]
    if kind == "local-chat-completions":
        cmd.append("--apply_chat_template")
    env = dict(os.environ, OPENAI_API_KEY=API_KEY, HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(root / "datasets_cache"), HF_HOME=str(root / "hf_home"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    samples = {}
    for f in glob.glob(str(root / out / "**" / "samples_*.jsonl"), recursive=True):
        task = Path(f).name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in open(f)]
    return samples


def _reference(model, tok, context: str, continuation: str) -> float:
    """transformers' log-likelihood of the continuation, tokenized as lm_eval does."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("tokenized", [True, False])
def test_loglikelihood_equals_transformers(setup, tokenized):
    _, model, tok, model_dir, _, _ = setup
    samples = _lm_eval(setup, "local-completions", "flaxserve_tiny_mc",
                       f"mc_{tokenized}", tokenizer_backend="huggingface",
                       tokenizer=str(model_dir), tokenized_requests=tokenized)
    docs = samples["flaxserve_tiny_mc"]
    assert len(docs) == 4
    checked = 0
    for doc in docs:
        for args, resp in zip(doc["arguments"].values() if isinstance(doc["arguments"], dict)
                              else doc["arguments"], doc["resps"]):
            context, continuation = (args["arg_0"], args["arg_1"]) if isinstance(args, dict) \
                else args
            ll = float(resp[0][0])
            assert ll == pytest.approx(_reference(model, tok, context, continuation), abs=1e-4)
            checked += 1
    assert checked == 12


def test_generate_until_five_stops(setup):
    servers, _, tok, model_dir, _, _ = setup
    samples = _lm_eval(setup, "local-completions", "flaxserve_tiny_gen", "gen",
                       tokenizer_backend="huggingface", tokenizer=str(model_dir))
    docs = samples["flaxserve_tiny_gen"]
    assert len(docs) == 3
    client = openai.OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)
    for doc in docs:
        answer = doc["resps"][0][0]
        assert not any(s in answer for s in STOPS)
        context = doc["arguments"]["gen_args_0"]["arg_0"] if isinstance(
            doc["arguments"], dict) else doc["arguments"][0][0]
        direct = client.completions.create(
            model="tiny", prompt=tok(context, add_special_tokens=False).input_ids,
            max_tokens=MAX_GEN, temperature=0, seed=1234, stop=STOPS + [tok.eos_token])
        assert answer == direct.choices[0].text


def test_chat_completions_generate_until(setup):
    samples = _lm_eval(setup, "local-chat-completions", "flaxserve_tiny_gen", "chat",
                       tokenizer_backend="none", tokenized_requests=False)
    docs = samples["flaxserve_tiny_gen"]
    assert len(docs) == 3
    for doc in docs:
        answer = doc["resps"][0][0]
        assert isinstance(answer, str)
        assert not any(s in answer for s in STOPS[:4])    # lm_eval sends 4 stops to chat
