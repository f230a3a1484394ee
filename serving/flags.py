"""Small parsers for command-line flag values shared by the commands (no heavy imports)."""

from __future__ import annotations


def int_list(text: str, flag: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; a ValueError naming the flag otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag} must list positive integers, got {text!r}")
    return values


def add_quantize_argument(parser) -> None:
    """--quantize (engine, serve, generate, bench decode); see docs/speed.md, "int8"."""
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="weight-only int8 with per-channel scales (model/quantize.py); "
                             "default: the weights as loaded")
