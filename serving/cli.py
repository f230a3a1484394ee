"""The `flaxserve` command line: a thin dispatcher.

Each subcommand lives in the module that does the work, which exposes
`add_arguments(parser)` and `run(args) -> int`; this file only maps names to modules, and
imports a module (and so JAX) only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("serving.serve", "engine and HTTP front end together (one command)"),
    "engine": ("serving.engine.main", "the gRPC batch server alone"),
    "http": ("serving.http.main", "the HTTP front end alone, against a running engine"),
    "generate": ("serving.generate", "generate in process, no servers"),
    "convert": ("checkpoints.convert", "convert a Hugging Face checkpoint or a GGUF file to orbax"),
    "pull": ("checkpoints.resolve", "fetch a model reference (smollm2, a Hub id) into the cache"),
}

BENCH_COMMANDS = {
    "decode": ("serving.bench_decode", "decode tokens/s, roofline fraction, vs transformers"),
    "sampling": ("sampling.bench", "cost of the sampler, all stages on vs off"),
    "serve": ("serving.bench_serve", "load generator against the gRPC or HTTP server"),
    "grammar": ("serving.bench_grammar", "constrained decoding: masked vs unmasked step"),
    "speculative": ("serving.bench_speculative", "speculative vs plain decoding, batch 1"),
    "waterfall": ("serving.bench_waterfall", "a batch-1 token's time piece by piece, from "
                  "its matmuls alone to the engine loop"),
    "compare": ("serving.bench_compare", "the same prompts through us and transformers / "
                "llama.cpp: tokens/s, TTFT, TPOT, bytes/token, ratios"),
}


class HelpFormatter(argparse.HelpFormatter):
    """`--help` with one entry per flag and its default: "(default: X)" is added unless the
    help text already speaks of its default (or there is none worth printing)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or default is None or
                default is argparse.SUPPRESS or isinstance(default, bool) or default == []):
            return text
        return f"{text} (default: %(default)s)"


def _add(sub, name, module, help_text, load: bool = True):
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=HelpFormatter)
    parser.set_defaults(_module=module)
    if not load:        # another command runs: its flags (and imports) are not needed
        return
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        parser.set_defaults(_missing=True)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All commands with their flags; with `only`, the flags of that command alone (so
    `flaxserve serve` with a busy port fails in a second, not after importing JAX)."""
    parser = argparse.ArgumentParser(prog="flaxserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text, load=only in (None, name))
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module, help_text) in BENCH_COMMANDS.items():
        _add(bench_sub, name, module, help_text, load=only in (None, "bench"))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"flaxserve: this command is not available in this build ({args._module})",
              file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as e:  # bad input: one clear line, non-zero exit
        print(f"flaxserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
