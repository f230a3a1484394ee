"""Training text for the bundled default model, fetched from a Debian package at train time.

The text is never committed: `fetch_fortunes` downloads the Debian `fortunes` package
(BSD-licensed fortune(6) data files, a few MB of short English quotations, jokes and
aphorisms) with `apt-get download`, unpacks it with `dpkg -x` into a temporary folder and
reads the plain-text files. Files that are mostly ASCII art, or that are crude, are left
out. `build_documents` turns each fortune into a training document: some stay plain text,
others are wrapped in ChatML turns (user: a topic request or the first sentence, assistant:
the fortune or its continuation, closed by <|im_end|>) so that chat replies come out as
English and end cleanly. Everything is deterministic given the seed.
"""

from __future__ import annotations

import glob
import os
import random
import re
import subprocess
import tempfile
from dataclasses import dataclass

DEBIAN_PACKAGE = "fortunes"
LICENSE = "BSD-3-Clause (fortune-mod data files; see /usr/share/doc/fortunes/copyright)"

# Fortune files used, with the topic word used in chat prompts. Left out: art and
# ascii-art (pictures), ethnic, men-women, drugs (crude), translate-me, zippy (noise).
TOPICS = {
    "computers": "computers", "cookie": "life", "debian": "Debian", "definitions": "words",
    "disclaimer": "disclaimers", "education": "education", "food": "food",
    "fortunes": "fortune", "goedel": "logic", "humorists": "humor", "kids": "children",
    "knghtbrd": "life", "law": "the law", "linux": "Linux", "linuxcookie": "Linux",
    "literature": "books", "love": "love", "magic": "magic", "medicine": "medicine",
    "miscellaneous": "anything", "news": "the news", "paradoxum": "paradoxes",
    "people": "people", "pets": "pets", "platitudes": "wisdom", "politics": "politics",
    "riddles": "riddles", "science": "science", "songs-poems": "poems", "sports": "sports",
    "startrek": "Star Trek", "tao": "the Tao", "wisdom": "wisdom", "work": "work",
}

TOPIC_PROMPTS = [
    "Tell me something about {topic}.",
    "Say something about {topic}.",
    "Do you know a saying about {topic}?",
    "Give me a quote about {topic}.",
    "What do you think about {topic}?",
]
GENERIC_PROMPTS = [
    "Tell me something.", "Say something wise.", "Tell me a story.", "Hello!",
    "Hi, how are you?", "Can you help me?", "Tell me a joke.", "What is the meaning of life?",
    "Write something for me.", "What should I know today?",
]
CONTINUE_PROMPTS = ["Continue: {start}", "{start}", "Continue the story: {start}",
                    "Finish this: {start}"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a witty assistant.",
                  "You answer in plain English."]

ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Fortune:
    topic: str
    text: str


def fetch_fortunes(workdir: str | None = None) -> tuple[list[Fortune], str]:
    """Download and unpack the Debian package; return the fortunes and the package version."""
    tmp = workdir or tempfile.mkdtemp(prefix="flaxserve-default-data-")
    os.makedirs(tmp, exist_ok=True)
    debs = glob.glob(os.path.join(tmp, f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        result = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp,
                                capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(
                f"apt-get download {DEBIAN_PACKAGE} failed (run `apt-get update` first?):\n"
                f"{result.stderr.strip()}")
    deb = sorted(debs)[-1]
    root = os.path.join(tmp, "root")
    subprocess.run(["dpkg", "-x", deb, root], check=True)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    folder = os.path.join(root, "usr", "share", "games", "fortunes")
    fortunes = []
    for name in sorted(TOPICS):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        for chunk in raw.split("\n%\n"):
            text = clean_fortune(chunk)
            if text:
                fortunes.append(Fortune(TOPICS[name], text))
    if not fortunes:
        raise RuntimeError(f"no fortunes found under {folder}")
    return fortunes, version


def clean_fortune(chunk: str) -> str | None:
    """Drop attributions and layout; keep prose whose characters are mostly letters."""
    lines = []
    for line in chunk.replace("\t", " ").splitlines():
        if re.match(r"^\s*(--|---)\s", line):
            break  # the attribution, and anything after it
        lines.append(line.strip())
    # Blank lines separate paragraphs; other line breaks are only layout.
    paragraphs = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n")]
    text = "\n".join(p for p in paragraphs if p).strip().strip("%").strip()
    if len(text) < 20 or len(text) > 1500:
        return None
    if not text.isascii():
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.85:
        return None
    return text


def split_first_sentence(text: str) -> tuple[str, str] | None:
    match = re.search(r"[.!?]\"?\s+(?=[A-Z\"])", text)
    if not match or match.end() < 15 or len(text) - match.end() < 20:
        return None
    return text[:match.end()].strip(), text[match.end():].strip()


def chatml(messages: list[tuple[str, str]]) -> str:
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def build_documents(fortunes: list[Fortune], seed: int) -> list[str]:
    """One training document per fortune: plain text, or a ChatML exchange."""
    rng = random.Random(seed)
    docs = []
    for fortune in fortunes:
        roll = rng.random()
        if roll < 0.4:
            docs.append(fortune.text + ENDOFTEXT)
            continue
        messages = []
        if rng.random() < 0.25:
            messages.append(("system", rng.choice(SYSTEM_PROMPTS)))
        split = split_first_sentence(fortune.text)
        if roll < 0.65 and split:
            messages.append(("user", rng.choice(CONTINUE_PROMPTS).format(start=split[0])))
            messages.append(("assistant", split[1]))
        elif roll < 0.85:
            messages.append(("user", rng.choice(TOPIC_PROMPTS).format(topic=fortune.topic)))
            messages.append(("assistant", fortune.text))
        else:
            messages.append(("user", rng.choice(GENERIC_PROMPTS)))
            messages.append(("assistant", fortune.text))
        docs.append(chatml(messages) + ENDOFTEXT)
    return docs


def split_train_val(fortunes: list[Fortune], seed: int, val_fraction: float = 0.05):
    """Shuffle once (seeded) and hold out a fraction of the fortunes for validation."""
    order = list(fortunes)
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(order) * val_fraction))
    return order[n_val:], order[:n_val]
