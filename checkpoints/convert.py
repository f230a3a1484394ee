"""`flaxserve convert (--hf DIR | --gguf FILE) --out DIR`: a Hugging Face checkpoint or a
GGUF file to our orbax format (the GGUF's tokenizer and chat template come along)."""

from __future__ import annotations

import os

from tqdm import tqdm


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face checkpoint directory")
    src.add_argument("--gguf", help="GGUF file (or a model reference that names one, e.g. smollm2)")
    parser.add_argument("--out", required=True, help="output directory (orbax)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameter dtype to store (default: per platform)")


def run(args) -> int:
    from checkpoints import hf, orbax_io
    from model.config import ModelConfig

    if args.gguf is not None:
        from checkpoints import gguf_read
        from checkpoints.gguf_tokenizer import tokenizer_dir
        from checkpoints.resolve import resolve

        path = resolve(args.gguf)
        if not (os.path.isfile(path) and gguf_read.is_gguf(path)):
            raise ValueError(f"--gguf {args.gguf}: not a GGUF file")
        total = gguf_read.count_leaves(path)
        with tqdm(total=total, unit="tensor", desc="convert") as bar:
            config, params = gguf_read.load_gguf(path, dtype=args.dtype,
                                                 progress=lambda _: bar.update())
        source_dir = tokenizer_dir(gguf_read.GGUFFile(path))
    else:
        config_file = os.path.join(args.hf, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"--hf {args.hf}: not a Hugging Face checkpoint directory "
                             f"(no config.json)")
        total = hf.count_leaves(ModelConfig.from_hf_file(config_file))
        with tqdm(total=total, unit="tensor", desc="convert") as bar:
            config, params = hf.load_hf(args.hf, dtype=args.dtype, progress=lambda _: bar.update())
        source_dir = args.hf
    orbax_io.save_checkpoint(args.out, config, params, tokenizer_dir=source_dir)
    print(f"wrote {args.out}: {config.family}, {config.num_params() / 1e6:.1f}M params, "
          f"{config.dtype}")
    return 0
