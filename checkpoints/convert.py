"""`flaxserve convert --hf DIR --out DIR`: a Hugging Face checkpoint to our orbax format."""

from __future__ import annotations

from tqdm import tqdm


def add_arguments(parser) -> None:
    parser.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (orbax)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameter dtype to store (default: per platform)")


def run(args) -> int:
    from checkpoints import hf, orbax_io
    from model.config import ModelConfig

    import os
    config_file = os.path.join(args.hf, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--hf {args.hf}: not a Hugging Face checkpoint directory (no config.json)")
    total = hf.count_leaves(ModelConfig.from_hf_file(config_file))
    with tqdm(total=total, unit="tensor", desc="convert") as bar:
        config, params = hf.load_hf(args.hf, dtype=args.dtype, progress=lambda _: bar.update())
    orbax_io.save_checkpoint(args.out, config, params, tokenizer_dir=args.hf)
    print(f"wrote {args.out}: {config.family}, {config.num_params() / 1e6:.1f}M params, {config.dtype}")
    return 0
