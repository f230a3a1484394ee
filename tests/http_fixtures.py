"""Shared fixtures of the HTTP tests: a tiny tokenizer, a tiny model dir, real servers.

The model dir holds a byte-level BPE tokenizer (300 tokens, trained here in milliseconds)
with a chat template, and a tiny random model written by the checkpoint code. Servers
(`flaxserve engine` + `flaxserve http` under gunicorn) are module-scoped: they start once
per test module, on free loopback ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if not loop.last or add_generation_prompt %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. The quick brown fox "
          "jumps over the lazy dog; 0123456789 !?"] * 8 + [
    "user assistant system developer: say hi. é ü ß 日本語 emoji 🙂 \n\t"]
API_KEY = "test-key-123"


def build_tokenizer(vocab_size: int = 300):
    """A real Hugging Face fast tokenizer, with BOS/EOS and the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<s>", "</s>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def health_ok(base_url: str) -> bool:
    """True once the HTTP front end at base_url answers /health with 200."""
    import urllib.request
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the OpenAI schema subset, as jsonschema reads it ---------------------------------------------

SPEC_PATH = Path("/work/shared/specs/openai-chat.openapi.json")


def _nullable(node):
    """OpenAPI 3.0's `nullable: true` -> JSON Schema's `null` type (and enum member)."""
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
        if "type" not in out and "enum" not in out:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


_COMPONENTS = None


def sse_events(body: bytes) -> list:
    """(event name or None, data) of each server-sent event in a response body, parsed by
    the openai SDK's own decoder: what real clients run (lines end at CR/LF only, so a
    U+2028 in generated text stays inside its data line)."""
    from openai._streaming import SSEDecoder
    return [(e.event, e.data) for e in SSEDecoder().iter_bytes(iter([body]))]


def validate_openai(instance: dict, schema_name: str) -> None:
    """Validate against a schema of the OpenAI subset (jsonschema, OpenAPI nullables)."""
    import jsonschema
    global _COMPONENTS
    if _COMPONENTS is None:
        _COMPONENTS = _nullable(json.loads(SPEC_PATH.read_text())["components"])
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema_name}",
                                   "components": _COMPONENTS})


# ---- a tiny model dir ------------------------------------------------------------------------------

_WRITE_MODEL = r"""
import sys
from model.config import ModelConfig
from model.decoder import init_params
from checkpoints.orbax_io import save_checkpoint
out, tok_dir, vocab, eos = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                     eos_token_ids=(eos,))
save_checkpoint(out, config, init_params(config, seed=0), tok_dir)
"""


def write_model_dir(root: Path) -> Path:
    """A tiny random model (orbax, via checkpoints.orbax_io) with the tiny tokenizer.

    Written by a child process, so the test process itself never imports JAX."""
    tok = build_tokenizer()
    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    model_dir = root / "model"
    subprocess.run([sys.executable, "-c", _WRITE_MODEL, str(model_dir), str(tok_dir),
                    str(len(tok)), str(tok.eos_token_id)], cwd=ROOT, check=True, timeout=300)
    return model_dir


# ---- real server processes --------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FLAXSERVE_API_KEYS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def one_prompt_prefill(args) -> list[str]:
    """`args` with `--prefill-batch 1` unless they choose: batched prefill adds a program per
    prompt bucket that every server start compiles in the background, on CI's two cores;
    tests/test_batched_prefill.py and tests/test_bench_cli.py test it."""
    args = list(args)
    return args if "--prefill-batch" in args else args + ["--prefill-batch", "1"]


def lazy_compile(args) -> list[str]:
    """`args` with `--lazy-compile` unless they choose a warm-up: a test server compiles
    only the programs its requests run (each on first use), not the ~40 a warm-up compiles
    (a warm-cache start's engine: 20 s of CPU -> 6.5 s on CI's two cores). The warm-ups
    themselves are tested in tests/test_startup.py, tests/test_device_engine.py and by the
    servers that tests/reliability/serve_proc.py and tests/test_router.py start."""
    args = list(args)
    chosen = {"--lazy-compile", "--full-warmup", "--warmup-only"} & set(args)
    return args if chosen else args + ["--lazy-compile"]


def _wait(check, proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Servers:
    """An engine and a gunicorn front end, as real processes on loopback ports."""

    def __init__(self, root: Path, api_keys: list[str], engine_args: list[str] = (),
                 model: str | None = None, served_names: tuple[str, ...] = ("tiny",
                                                                         "tiny-alias"),
                 http_args: list[str] = ()):
        from serving.http.engine_link import EngineLink

        # `model`: serve that model (e.g. "default") instead of a tiny random one
        self.model_dir = model if model is not None else write_model_dir(root)
        self.grpc_port, self.port = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "servers.log", "w")
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "engine", "--model", str(self.model_dir),
             "--grpc-port", str(self.grpc_port),
             *lazy_compile(one_prompt_prefill(engine_args))],
            cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.http = None
        try:
            self.link = EngineLink(f"127.0.0.1:{self.grpc_port}")
            # the front end starts with the engine (it answers 503 until the engine is up),
            # as `flaxserve serve` does: its start-up overlaps the engine's
            cmd = [sys.executable, "-m", "serving.http.main", "--engine",
                   f"127.0.0.1:{self.grpc_port}", "--port", str(self.port), "--workers", "1",
                   *http_args]
            for name in served_names:
                cmd += ["--served-model-name", name]
            for k in api_keys:
                cmd += ["--api-key", k]
            self.http = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self.log,
                                         stderr=subprocess.STDOUT)
            _wait(self.link.healthy, self.engine, "flaxserve engine", 300)
            _wait(self._http_up, self.http, "flaxserve http", 60)
        except BaseException:
            self.close()
            raise

    def _http_up(self) -> bool:
        return health_ok(self.base_url)

    def worker_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.http.pid:
                    pids.append(int(entry.name))
        return pids

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.http is not None:
            _stop(self.http)
        _stop(self.engine)
        self.link.close() if hasattr(self, "link") else None
        self.log.close()


def start_servers(tmp_path_factory, api_keys=(API_KEY,)):
    """Module-scoped fixture body: `yield from start_servers(...)`."""
    with Servers(tmp_path_factory.mktemp("http"), list(api_keys),
                 ["--max-slots", "4", "--max-model-len", "256"]) as servers:
        yield servers
