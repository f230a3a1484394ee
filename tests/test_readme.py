"""The README's quick start works as printed: `flaxserve serve` with no arguments serves the
default model, and the curl and `openai` snippets of "Talk to it" run against it (only the
port is changed, so the test does not collide with a server already on 8000)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.http_fixtures import ROOT, _env, _stop, _wait, free_port, health_ok

pytestmark = pytest.mark.timeout(600)
README = (ROOT / "README.md").read_text()


def snippets(lang: str) -> list[str]:
    section = README.split("## Talk to it", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_readme_opens_with_the_two_commands():
    head = README.split("## ", 1)[0]
    assert "pip install -e . && flaxserve serve" in head
    run = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test,eval]'" in run and "python -m pytest -q" in run
    assert "pip install -e '.[test,eval]' && python -m pytest -q" in head


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("readme") / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port),
                             "--grpc-port", str(grpc_port)], cwd=ROOT, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)

    up = lambda: health_ok(f"http://127.0.0.1:{port}")
    try:
        _wait(up, proc, "flaxserve serve", 500)
        yield port
    finally:
        _stop(proc)
        log.close()


def test_curl_snippet(server):
    (block,) = snippets("bash")
    out = subprocess.run(["bash", "-c", block.replace(":8000", f":{server}")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["model"] == "default" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] >= 1


def test_openai_snippet(server):
    openai_block, anthropic_block = snippets("python")
    out = subprocess.run([sys.executable, "-c", openai_block.replace(":8000", f":{server}")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert "completion_tokens=" in out.stdout and "gpu_seconds" in out.stdout


def test_anthropic_snippet_sends_sampling_in_extra_body(server):
    block = snippets("python")[1]
    assert "extra_body" in block and '"temperature"' in block
    out = subprocess.run([sys.executable, "-c", block.replace(":8000", f":{server}")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert "output_tokens=" in out.stdout
