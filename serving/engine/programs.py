"""The names of the engine's compiled programs, in one place.

The background compilation (serving/engine/warmup.py) names each job it compiles, and the
device engine (serving/engine/device.py, prefill_plan.py) asks by name whether a program
is ready (`DeviceEngine._unready`, `_ready_spans`) or waits for one under way
(`_await_program`). Both sides must spell a name the same way, so every name is built
here; tests set `_unready` to these strings too.
"""

from __future__ import annotations


def prefill(bucket: int) -> str:
    """A fresh prompt (from position 0) in `bucket`, attending over its own chunk."""
    return f"prefill {bucket}"


def cached_prefill(bucket: int) -> str:
    """A chunk after a cached prefix, attending over the whole cache row."""
    return f"prefill {bucket} (cached prefix)"


def cached_prefill_span(bucket: int, span: int) -> str:
    """A chunk after a cached prefix that attends over cache positions [0, span) only."""
    return f"prefill {bucket} (cached prefix) x {span}"


def batched_prefill(rows: int, bucket: int) -> str:
    return f"batched prefill {rows} x {bucket}"


def decode(rows: int, attend: int) -> str:
    """The decode forward over the first `rows` slots, attending over `attend` positions."""
    return f"decode {rows} slots x {attend}"


def sampler(rows: int, full: bool = False) -> str:
    """The decode sampler over `rows` slots (lean, or full: every stage)."""
    return f"{'full ' if full else ''}sampler {rows} slots"


def first_sampler(full: bool = False) -> str:
    return f"{'full ' if full else ''}first-token sampler"


def multi_decode(steps: int, rows: int, attend: int, full: bool = False) -> str:
    """`steps` decode steps in one program (serving/engine/multi_step.py)."""
    return f"{steps}-step decode {rows} slots x {attend}{', full sampler' if full else ''}"


def cache_copy(paged: bool) -> str:
    return "block copy" if paged else "slot copy"
