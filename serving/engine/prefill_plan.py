"""Batched prefill planning: which waiting prompts share one compiled prefill program.

Prefilling each prompt on its own costs one program per prompt, so 32 requests arriving
together wait for 32 programs before the last one sees a token. A batched prefill runs R
prompts padded to one bucketed length T as a [R, T] batch (rows of a smaller length and
padding rows write nothing). To keep the number of compiled programs small, R comes from a
few row buckets (`row_buckets`) and T from the engine's prefill buckets, and `plan` groups
prompts by bucket so padding stays low. A prompt prefilled alone just past a bucket is
split in two existing programs rather than padded to the next bucket (`split_head`). Pure
functions; the device calls are DeviceEngine.insert_many's and insert's.
"""

from __future__ import annotations

from serving.engine import programs


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Row counts a batched prefill program may have: 4, 16, ... below max_rows, then
    max_rows (empty when max_rows < 2: batching off)."""
    if max_rows < 2:
        return ()
    out, b = [], 4
    while b < max_rows:
        out.append(b)
        b *= 4
    return tuple(out) + (max_rows,)


def bucket_of(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n tokens."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"chunk of {n} tokens exceeds the largest prefill bucket {buckets[-1]}")


def split_head(n: int, buckets: tuple[int, ...], ready=lambda name: True) -> int:
    """Tokens of a fresh n-token prompt to prefill first as a chunk of their own (0: the
    whole prompt in one bucket). A prompt just past a bucket (129 tokens: a 128-token
    text plus a BOS or a chat template) would run the next bucket, twice the arithmetic;
    run as the largest bucket below it (fresh) plus the rest in a small bucket after that
    cached prefix, it costs the two buckets. Done when they sum to at most 3/4 of n's own
    bucket (129-192 tokens with buckets ..., 128, 256: 144-192 instead of 256) and both
    programs are compiled (`ready(name)`, warmup.py's job names): the programs already
    exist, so nothing new compiles and a first request waits for nothing."""
    whole = next((b for b in buckets if n <= b), None)
    head = max((b for b in buckets if b < n), default=0)
    if whole is None or not head:
        return 0
    tail = bucket_of(n - head, buckets)
    if 4 * (head + tail) > 3 * whole:
        return 0
    if not (ready(programs.prefill(head)) and ready(programs.cached_prefill(tail))):
        return 0
    return head


def alone_cost(n: int, buckets: tuple[int, ...]) -> int:
    """Token rows a fresh n-token prompt prefilled alone computes: its bucket, or the two
    smaller ones `split_head` runs it as."""
    head = split_head(n, buckets)
    return head + bucket_of(n - head, buckets) if head else bucket_of(n, buckets)


def plan(lengths: list[int], rows: tuple[int, ...], buckets: tuple[int, ...],
         padding_costs: bool = False) -> list[tuple[list[int], int, int]]:
    """Groups of prompt indices as (indices, R, T): R rows (1: the one-prompt path) of T
    tokens. Prompts are grouped by their bucket, at most rows[-1] to a group; a prompt left
    alone in its bucket joins the next larger bucket's group (it fits there), so only a
    prompt alone at the top is prefilled on its own. Every index appears once, in order
    within a group.

    padding_costs (a CPU, where a prefill is bound by arithmetic, so a padding row or
    position costs what a real one does): a group is formed only where its R x T token
    rows are at most what its prompts cost alone (`alone_cost`), so 3 prompts of 158
    tokens are three 128 + 32 prefills (480 rows), not one [4, 256] (1024); the rest run
    alone. On an accelerator the padding is nearly free and fewer, wider programs win."""
    if not rows:
        return [([i], 1, bucket_of(n, buckets)) for i, n in enumerate(lengths)]
    if padding_costs:
        return _plan_by_cost(lengths, rows, buckets)
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_of(n, buckets), []).append(i)
    out, carry = [], []
    for t in buckets:
        members = carry + by_bucket.get(t, [])
        carry = []
        while len(members) > rows[-1]:
            out.append((members[:rows[-1]], rows[-1], t))
            members = members[rows[-1]:]
        if len(members) == 1 and t != buckets[-1]:
            carry = members
        elif len(members) == 1:
            out.append((members, 1, bucket_of(lengths[members[0]], buckets)))
        elif members:
            out.append((members, next(r for r in rows if r >= len(members)), t))
    return out


def _plan_by_cost(lengths, rows, buckets):
    """`plan` with padding_costs: per bucket, the widest group whose padded rows cost no
    more than its prompts alone, else the widest unpadded one that does, else alone."""
    out = []
    for t in buckets:
        members = [i for i, n in enumerate(lengths) if bucket_of(n, buckets) == t]
        while len(members) > 1:
            k = min(len(members), rows[-1])
            wide = next(r for r in rows if r >= k)              # k prompts, padded to it
            exact = max((r for r in rows if r <= k), default=0)  # that many, no padding
            for r, take in ((wide, k), (exact, exact)):
                group = members[:take]
                if take > 1 and r * t <= sum(alone_cost(lengths[i], buckets) for i in group):
                    out.append((group, r, t))
                    members = members[take:]
                    break
            else:
                break
        out += [([i], 1, t) for i in members]
    return out
