"""Train the bundled default model: a few-million-parameter Llama on fortune(6) text.

`flaxserve serve` with no --model serves this checkpoint, and most tests use it, so it
must be small, fast and still answer in English words that end cleanly. It is trained
from scratch on CPU in about half an hour: the text comes from a Debian package at train
time (checkpoints/default_data.py), a sentencepiece tokenizer with the ChatML, reasoning
and tool-call tokens is trained on the same text, and the model is the Llama layout of
model/decoder.py. Training is seeded and resumable (the state is saved as .npz in the work
folder every --save-every steps); the loss goes to a jsonl log.

    python3 -m checkpoints.train_default [--out checkpoints/default] [--steps N] [--resume]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from checkpoints import default_data
from model import decoder
from model.config import ModelConfig

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>"]
EOS_PIECE = "<|endoftext|>"
VOCAB_SIZE = 4096

CHAT_TEMPLATE = """\
{#- ChatML (Qwen/Hermes style): tools in the system turn, calls as <tool_call>{json}</tool_call>,
    tool results as <tool_response> in a user turn, optional <think> reasoning. -#}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{{- message.content or '' }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' }}
{{- (fn.arguments if fn.arguments is string else (fn.arguments | tojson)) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""


def model_config(vocab_size: int, eos_ids: tuple[int, ...]) -> ModelConfig:
    """~3.8M parameters; float32 weights stay under 16 MB."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=640,
                       num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                       family="llama", max_position_embeddings=2048, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_ids=eos_ids, dtype="float32")


# -- tokenizer ----------------------------------------------------------------------


def train_tokenizer(fortunes, out_dir: str, seed: int) -> spm.SentencePieceProcessor:
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w") as f:
        for fortune in fortunes:
            f.write(fortune.text + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(out_dir, "tokenizer"), model_type="bpe",
        vocab_size=VOCAB_SIZE, character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        bos_piece="<s>", eos_piece=EOS_PIECE, user_defined_symbols=SPECIAL_TOKENS,
        num_threads=2, minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    return spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))


def write_tokenizer_files(sp: spm.SentencePieceProcessor, out_dir: str) -> tuple[int, ...]:
    """tokenizer_config.json (chat template, special tokens) and generation_config.json."""
    ids = {piece: sp.piece_to_id(piece) for piece in SPECIAL_TOKENS + [EOS_PIECE, "<s>", "<unk>"]}
    eos_ids = (ids["<|im_end|>"], ids[EOS_PIECE])
    added = {str(ids[p]): {"content": p, "special": True}
             for p in ["<unk>", "<s>", EOS_PIECE] + SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "tokenizer_file": "tokenizer.model",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": EOS_PIECE,
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        # sentencepiece adds no dummy prefix here; without this transformers' Llama
        # tokenizer would put "\u2581" before the first word
        "add_prefix_space": False,
        "model_max_length": 2048,
        "additional_special_tokens": SPECIAL_TOKENS,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"eos_token_id": list(eos_ids), "pad_token_id": ids[EOS_PIECE],
                  "bos_token_id": None, "max_new_tokens": 128}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    return eos_ids


def encode_stream(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """Token ids of the documents back to back; <|endoftext|> (sentencepiece's eos, a
    control symbol that `encode` does not parse from text) is appended as its id."""
    eos = sp.piece_to_id(EOS_PIECE)
    pieces = []
    for doc in docs:
        body = doc.removesuffix(EOS_PIECE)
        pieces.append(np.asarray(sp.encode(body) + ([eos] if body != doc else []), np.int32))
    return np.concatenate(pieces)


# -- training -----------------------------------------------------------------------


def _optax():
    """optax is the `train` extra's (serving never needs it): imported when training runs."""
    try:
        import optax
    except ImportError:
        raise ImportError("training the default model needs optax: pip install "
                          "'flaxserve[train]' (or pip install optax)") from None
    return optax


def loss_fn(params, config: ModelConfig, batch):
    """Mean next-token cross-entropy over [B, T+1] windows, through decoder.forward."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    b, t = inputs.shape
    cache = decoder.init_cache(config, b, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = decoder.forward(config, params, cache, inputs, positions)
    return _optax().softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(steps: int, peak_lr: float) -> "optax.GradientTransformation":
    optax = _optax()
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, warmup_steps=min(200, steps // 10 + 1), decay_steps=steps,
        end_value=peak_lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.05))


def sample_batch(stream: np.ndarray, step: int, seed: int, batch: int, seq_len: int):
    """Random windows; depends only on (seed, step), so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
    return np.stack([stream[s:s + seq_len + 1] for s in starts])


def eval_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = (len(stream) - 1) // seq_len
    return np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


def save_state(path: str, step: int, params, opt_state) -> None:
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    tmp = path + ".tmp.npz"
    np.savez(tmp, step=step, **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def load_state(path: str, params, opt_state):
    data = np.load(path)
    treedef = jax.tree_util.tree_structure((params, opt_state))
    leaves = [jnp.asarray(data[f"leaf_{i}"]) for i in range(treedef.num_leaves)]
    params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    return int(data["step"]), params, opt_state


# -- generation (for samples and tests) ---------------------------------------------


_jit_forward = jax.jit(decoder.forward, static_argnums=0)


def generate(config: ModelConfig, params, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, stop_ids=()) -> list[int]:
    """A minimal prefill + decode loop: greedy when temperature is 0."""
    max_len = -(-(len(prompt_ids) + max_new_tokens) // 128) * 128  # fewer compiled shapes
    cache = decoder.init_cache(config, 1, max_len)
    step = functools.partial(_jit_forward, config)
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    positions = jnp.arange(len(prompt_ids), dtype=jnp.int32)[None]
    logits, cache = step(params, cache, tokens, positions)
    key = jax.random.key(seed)
    out = []
    for i in range(max_new_tokens):
        last = logits[0, -1]
        if temperature > 0:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, last / temperature))
        else:
            token = int(jnp.argmax(last))
        if token in stop_ids:
            break
        out.append(token)
        pos = len(prompt_ids) + i
        logits, cache = step(params, cache, jnp.asarray([[token]], jnp.int32),
                             jnp.asarray([[pos]], jnp.int32))
    return out


def chat_prompt(user: str, system: str | None = None) -> str:
    turns = [("system", system)] if system else []
    turns.append(("user", user))
    return default_data.chatml(turns) + "<|im_start|>assistant\n"


SAMPLE_PROMPTS = ["Tell me something about science.", "Hello! How are you?",
                  "Continue the story: The old man walked into the village at dawn."]


def write_samples(config, params, sp, eos_ids, path: str) -> list[dict]:
    samples = []
    for i, user in enumerate(SAMPLE_PROMPTS):
        prompt = chat_prompt(user)
        for temperature in (0.0, 0.8):
            ids = generate(config, params, sp.encode(prompt), 96, temperature, seed=i,
                           stop_ids=eos_ids)
            samples.append({"prompt": user, "temperature": temperature,
                            "reply": sp.decode(ids)})
    with open(path, "w") as f:
        json.dump(samples, f, indent=2)
    return samples


# -- main ---------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "default"))
    parser.add_argument("--workdir", default="/tmp/flaxserve-train-default")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from the work folder")
    args = parser.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    fortunes, version = default_data.fetch_fortunes(os.path.join(args.workdir, "data"))
    train_f, val_f = default_data.split_train_val(fortunes, args.seed)
    tok_dir = os.path.join(args.workdir, "tokenizer")
    if args.resume and os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    else:
        sp = train_tokenizer(train_f, tok_dir, args.seed)
    eos_ids = write_tokenizer_files(sp, tok_dir)
    train_stream = encode_stream(sp, default_data.build_documents(train_f, args.seed))
    val_stream = encode_stream(sp, default_data.build_documents(val_f, args.seed + 1))
    print(f"fortunes {version}: {len(train_f)} train / {len(val_f)} val documents, "
          f"{len(train_stream)} / {len(val_stream)} tokens")

    config = model_config(sp.get_piece_size(), eos_ids)
    params = decoder.init_params(config, seed=args.seed)
    optimizer = make_optimizer(args.steps, args.lr)
    opt_state = optimizer.init(params)
    state_path = os.path.join(args.workdir, "state.npz")
    log_path = os.path.join(args.workdir, "loss.jsonl")
    start, elapsed_before, loss_before = 0, 0.0, float("nan")
    if args.resume and os.path.exists(state_path):
        start, params, opt_state = load_state(state_path, params, opt_state)
        if os.path.exists(log_path):
            with open(log_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [r for r in rows if r["step"] <= start]
            elapsed_before = rows[-1]["elapsed_s"] if rows else 0.0
            loss_before = rows[-1]["loss"] if rows else float("nan")
            with open(log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"resumed at step {start}")
    elif os.path.exists(log_path):
        os.remove(log_path)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, config, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return _optax().apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(lambda p, b: loss_fn(p, config, b))

    def validation_loss(params) -> float:
        windows = eval_windows(val_stream, args.seq_len)
        losses = [float(eval_loss(params, windows[i:i + args.batch]))
                  for i in range(0, len(windows) - args.batch + 1, args.batch)]
        return float(np.mean(losses))

    t0 = time.time() - elapsed_before
    loss = loss_before
    with open(log_path, "a") as log:
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
        for step in bar:
            batch = sample_batch(train_stream, step, args.seed, args.batch, args.seq_len)
            params, opt_state, loss_arr = train_step(params, opt_state, batch)
            if (step + 1) % 10 == 0 or step + 1 == args.steps:
                loss = float(loss_arr)
                bar.set_postfix(loss=f"{loss:.3f}")
                log.write(json.dumps({"step": step + 1, "loss": loss,
                                      "elapsed_s": round(time.time() - t0, 1)}) + "\n")
                log.flush()
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_state(state_path, step + 1, params, opt_state)
        save_state(state_path, args.steps, params, opt_state)
    train_time = time.time() - t0
    if math.isnan(loss):
        loss = float(loss_fn(params, config, sample_batch(train_stream, 0, args.seed,
                                                          args.batch, args.seq_len)))

    val = validation_loss(params)
    print(f"final train loss {loss:.3f}, validation loss {val:.3f}, ppl {math.exp(val):.1f}")
    metrics = {
        "parameters": config.num_params(),
        "training_steps": args.steps,
        "batch_size": args.batch,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "train_tokens": int(len(train_stream)),
        "validation_tokens": int(len(val_stream)),
        "training_time_s": round(train_time, 1),
        "final_train_loss": round(loss, 4),
        "validation_loss": round(val, 4),
        "validation_perplexity": round(math.exp(val), 2),
        "data": {"debian_package": default_data.DEBIAN_PACKAGE, "version": version,
                 "license": default_data.LICENSE},
        "seed": args.seed,
        "platform": jax.default_backend(),
    }
    with open(os.path.join(args.workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    samples = write_samples(config, params, sp, eos_ids,
                            os.path.join(args.workdir, "samples.json"))
    for s in samples:
        print(f"[{s['temperature']}] {s['prompt']!r} -> {s['reply']!r}")
    try:
        from checkpoints.orbax_io import save_checkpoint
    except ImportError:
        print("checkpoints.orbax_io is not available yet: the trained state stays in "
              f"{args.workdir}; run again with --resume to save the checkpoint")
        return 1
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(args.out, config, jax.device_get(params), tokenizer_dir=tok_dir)
    for name in ("metrics.json", "samples.json", "loss.jsonl"):
        shutil.copy(os.path.join(args.workdir, name), os.path.join(args.out, name))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
