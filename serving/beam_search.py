"""Beam search (vLLM's request spelling: `use_beam_search`, `n`, `length_penalty`).

The classic baseline of sampling papers, as Hugging Face `transformers` runs it
(`GenerationMixin._beam_search`, do_sample=False), so its beams equal
`generate(num_beams=W, num_return_sequences=n, length_penalty=..., early_stopping=...)`
on the same weights. With W beams (`best_of`, else `n`) and E stop ids, every step:

1. scores = log_softmax(logits) of each running beam + its running score (the first step
   expands beam 0 only: the other beams start at -1e9);
2. the K = max(2, 1 + E) * W best of the W x V continuations are candidates;
3. a candidate ending in a stop id, or reaching max_tokens, is finished; among the first
   W candidates those finished are offered to the finished list with the score
   cumulative_logprob / generated_length ** length_penalty (the stop token counts), and the
   W best finished hypotheses are kept;
4. the W best unfinished candidates run on; the search ends when no running beam can still
   beat the worst finished one (HF's heuristic: its score at its current length), when
   `early_stopping` is true and W hypotheses are finished, or when every candidate finished.

The n best finished hypotheses come back, best first, each with its `score` (length
penalised) and `cumulative_logprob`; with `logprobs` / `top_logprobs`, each token's own
log-probability under the model, its rank and the top alternatives at its step (gathered
on the device with the candidates, carried along with the tokens when beams reorder). (vLLM divides by the length including the prompt and
excluding EOS; HF, and we, by the generated length including it.)

It is its own loop over the decoder, not the continuous batcher: one request, W rows in a
dense KV cache of its own, reordered by the chosen parents each step (one gather). The
engine runs it on its device thread, one beam step between its decode steps, so the
device keeps one owner and other requests keep moving (serving/engine/scheduler.py).
Only the K candidates' scores and ids reach the host each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from model.decoder import forward, init_cache
from sampling.params import SamplingParams

NEG = np.float32(-1.0e9)


@dataclass
class Beam:
    token_ids: list[int]          # generated tokens, the stop token included (as HF)
    score: float                  # cumulative_logprob / len(token_ids) ** length_penalty
    cumulative_logprob: float
    finish_reason: str            # "stop" (a stop id) or "length"
    text: str = ""                # decoded by the caller (LocalModel, the engine)
    # with logprobs: per token (logprob, rank, top ids, top logprobs), else None
    logprobs: list[tuple[float, int, list[int], list[float]]] | None = None


def _bucket(n: int, cap: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return min(b, cap)


class BeamSearcher:
    """Beam search over one model's weights; `run` blocks, `steps` yields after each
    device call (so a scheduler can interleave it with its own work)."""

    def __init__(self, config, params, max_len: int, stop_ids=()):
        self.config, self.params, self.max_len = config, params, max_len
        self.stop_ids = tuple(sorted(set(int(t) for t in stop_ids)))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("width", "k", "top"))
        self._step = jax.jit(self._step_fn, static_argnames=("k", "top"), donate_argnums=(1,))

    # -- device side (jitted) ----------------------------------------------------------------

    def _select(self, logits, running, k, top=-1):
        """The k best continuations (scores, flat ids); top >= 0 (logprobs asked) adds each
        candidate's token logprob, rank and its row's `top` best (logprobs, ids)."""
        lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        vals, idx = jax.lax.top_k((lsm + running[:, None]).reshape(-1), k)
        if top < 0:
            return vals, idx, ()
        parent = idx // lsm.shape[1]
        tok_lp = lsm.reshape(-1)[idx]
        rank = 1 + jnp.sum(lsm[parent] > tok_lp[:, None], axis=-1)
        top_lp, top_ids = jax.lax.top_k(lsm, max(top, 1))
        return vals, idx, (tok_lp, rank, top_ids[parent][:, :top], top_lp[parent][:, :top])

    def _prefill_fn(self, params, tokens, true_len, running, *, width, k, top=-1):
        cache = init_cache(self.config, 1, self.max_len)
        pos = jnp.arange(tokens.shape[1])
        positions = jnp.where(pos < true_len, pos, self.max_len)[None]  # pads write nowhere
        logits, cache = forward(self.config, params, cache, tokens, positions,
                                logits_index=(true_len - 1)[None])
        cache = jax.tree.map(lambda c: jnp.repeat(c, width, axis=0), cache)
        vals, idx, extra = self._select(jnp.repeat(logits, width, axis=0), running, k, top)
        return vals, idx, extra, cache

    def _step_fn(self, params, cache, tokens, position, parents, running, *, k, top=-1):
        cache = jax.tree.map(lambda c: c[parents], cache)
        positions = jnp.full((tokens.shape[0], 1), position, jnp.int32)
        logits, cache = forward(self.config, params, cache, tokens[:, None], positions)
        vals, idx, extra = self._select(logits[:, 0], running, k, top)
        return vals, idx, extra, cache

    # -- host side: HF's bookkeeping ---------------------------------------------------------

    def run(self, prompt_ids, sampling: SamplingParams) -> list[Beam]:
        it = self.steps(prompt_ids, sampling)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value

    def steps(self, prompt_ids, sampling: SamplingParams) -> Iterator[None]:
        prompt = np.asarray(prompt_ids, np.int32)
        p_len = len(prompt)
        if p_len == 0:
            raise ValueError("prompt: beam search needs at least one prompt token")
        if p_len >= self.max_len:
            raise ValueError(f"prompt: {p_len} tokens leave no room in the context "
                             f"({self.max_len})")
        width = sampling.best_of or sampling.n
        n_out = sampling.n
        stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.stop_ids))
        k = max(2, 1 + len(stops)) * width
        max_new = min(sampling.max_tokens or self.max_len, self.max_len - p_len)
        max_length = p_len + max_new
        lp_exp, early = float(sampling.length_penalty), bool(sampling.early_stopping)
        stop_arr = np.array(sorted(stops), np.int64)
        vocab = self.config.vocab_size
        top = sampling.top_logprobs if (sampling.logprobs or sampling.top_logprobs) else -1
        # with logprobs: per running beam / finished hypothesis, its tokens' (logprob, rank,
        # top ids, top logprobs) arrays, reordered with the tokens
        t = max(top, 0)
        run_hist = (np.zeros((width, 0), np.float32), np.zeros((width, 0), np.int64),
                    np.zeros((width, 0, t), np.int64), np.zeros((width, 0, t), np.float32))
        fin_hist: list = [tuple(h[0] for h in run_hist)] * width

        running_tokens = np.zeros((width, 0), np.int64)
        running = np.full(width, NEG, np.float32)
        running[0] = 0.0
        fin_tokens: list = [np.zeros(0, np.int64)] * width
        fin_scores = np.full(width, NEG, np.float32)
        fin_cum = np.zeros(width, np.float32)
        fin_done = np.zeros(width, bool)
        unsatisfied = True
        cur_len = p_len

        bucket = _bucket(p_len, self.max_len)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :p_len] = prompt
        vals, idx, extra, cache = self._prefill(self.params, jnp.asarray(tokens),
                                                jnp.int32(p_len), jnp.asarray(running),
                                                width=width, k=k, top=top)
        while True:
            vals, idx = np.asarray(vals, np.float32), np.asarray(idx, np.int64)
            yield
            parent, tok = idx // vocab, idx % vocab
            cand = np.concatenate([running_tokens[parent], tok[:, None]], axis=1)
            cand_hist = tuple(np.concatenate([h[parent], np.asarray(x)[:, None]], axis=1)
                              for h, x in zip(run_hist, extra))
            hits = np.isin(tok, stop_arr) | (cur_len + 1 >= max_length)
            # the running beams of the next step
            run_lp = (vals + hits.astype(np.float32) * NEG).astype(np.float32)
            keep = np.argsort(-run_lp, kind="stable")[:width]
            running_tokens, running, parents = cand[keep], run_lp[keep], parent[keep]
            run_hist = tuple(h[keep] for h in cand_hist)
            # the finished hypotheses
            just = hits & (np.arange(k) < width)
            scores = (vals / np.float32((cur_len + 1 - p_len) ** lp_exp)).astype(np.float32)
            if early and fin_done.all():
                scores = scores + NEG
            if not unsatisfied:
                scores = scores + NEG
            scores = (scores + (~just).astype(np.float32) * NEG).astype(np.float32)
            merged_scores = np.concatenate([fin_scores, scores])
            best = np.argsort(-merged_scores, kind="stable")[:width]
            merged_tokens = fin_tokens + list(cand)
            fin_tokens = [merged_tokens[i] for i in best]
            if extra:
                merged_hist = fin_hist + [tuple(h[i] for h in cand_hist) for i in range(k)]
                fin_hist = [merged_hist[i] for i in best]
            fin_scores = merged_scores[best]
            fin_cum = np.concatenate([fin_cum, vals])[best]
            fin_done = np.concatenate([fin_done, just])[best]
            cur_len += 1
            best_possible = running[0] / np.float32((cur_len - p_len) ** lp_exp)
            worst = np.where(fin_done, fin_scores.min(), NEG)
            unsatisfied = unsatisfied and bool(np.any(best_possible > worst))
            if not unsatisfied or (early and fin_done.all()) or hits.all():
                break
            vals, idx, extra, cache = self._step(
                self.params, cache, jnp.asarray(running_tokens[:, -1], jnp.int32),
                jnp.int32(cur_len - 1), jnp.asarray(parents, jnp.int32), jnp.asarray(running),
                k=k, top=top)
        out = []
        for i in range(n_out):
            ids = [int(t) for t in fin_tokens[i]]
            reason = "stop" if ids and ids[-1] in stops else "length"
            lps = None
            if top >= 0:
                lp, rank, tids, tlps = fin_hist[i]
                lps = [(float(lp[j]), int(rank[j]), [int(x) for x in tids[j]],
                        [float(x) for x in tlps[j]]) for j in range(len(ids))]
            out.append(Beam(ids, float(fin_scores[i]), float(fin_cum[i]), reason,
                            logprobs=lps))
        return out
