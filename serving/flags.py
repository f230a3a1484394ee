"""Small parsers for command-line flag values shared by the commands (no heavy imports)."""

from __future__ import annotations

import argparse


def int_list(text: str, flag: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; a ValueError naming the flag otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag} must list positive integers, got {text!r}")
    return values


def counts_per_level(num_requests: str | None, levels: list, default) -> list[int]:
    """--num-requests for a bench: one count for every --concurrency level, or one per
    level; `default(level)` when the flag is absent."""
    counts = (int_list(num_requests, "--num-requests") if num_requests
              else [default(c) for c in levels])
    if len(counts) == 1:
        counts = counts * len(levels)
    if len(counts) != len(levels):
        raise ValueError("--num-requests: give one count, or one per --concurrency")
    return counts


def add_quantize_argument(parser) -> None:
    """--quantize (engine, serve, generate, bench decode); see docs/speed.md, "int8"."""
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="weight-only int8 with per-channel scales (model/quantize.py); on "
                             "CPU its matmuls run our int8 kernel, built on first use "
                             "(model/int8_kernel.py); default: the weights as loaded")


def positive_int(text: str) -> int:
    """An argparse `type` for counts of at least 1: argparse names the flag in its error
    ("argument --decode-steps: must be an integer >= 1, got '0'")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_cpu_matmul_argument(parser, default: str | None = None) -> None:
    """--cpu-matmul (engine, serve, bench serve, bench decode); docs/speed.md, "Which
    library runs the decode matmuls"."""
    parser.add_argument("--cpu-matmul", choices=("auto", "default", "eigen"), default=default,
                        help="on CPU, the library for the decode programs' matmuls: XLA's "
                             "default (YNNPACK), Eigen, or auto: measured once per machine "
                             "and model at start (serving/engine/cpu_matmul.py); default auto")


def add_decode_steps_argument(parser) -> None:
    """--decode-steps (engine, serve, generate); see docs/speed.md, "Multi-step decode"."""
    parser.add_argument("--decode-steps", type=positive_int, default=None, metavar="K",
                        help="decode steps per device dispatch while every running row "
                             "allows it and no request waits (serving/engine/multi_step.py); "
                             "default 1")
