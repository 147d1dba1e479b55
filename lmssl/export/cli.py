"""``lmssl export RUN_DIR OUT_DIR [--push-to-hub USER/NAME] [--private] [--overwrite]``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a run's newest good checkpoint to OUT_DIR: config.json, model.safetensors, the tokenizer, "
        "generation_config.json (decoders), the loss curve and a model card. gpt2 runs become GPT2LMHeadModel, "
        "llama runs LlamaForCausalLM, bert (MLM) runs BertForMaskedLM, modernbert (MLM) runs ModernBertForMaskedLM, "
        "all loadable with AutoModelFor* and "
        "AutoModel without trust_remote_code. The folder is reloaded and compared with lmssl (max |logit diff| "
        "<= 1e-4) before it is moved into place. Runs with no exact transformers twin (family custom) are "
        "exported as lmssl backbone weights + config + a README saying how to load them.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's train.output_dir (holds run.json and checkpoints/)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created; must be empty unless --overwrite)")
    parser.add_argument("--push-to-hub", metavar="USER/NAME", default=None,
                        help="also upload the folder to this Hub repo (token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--license", default="apache-2.0", help="license in the model card (default: apache-2.0)")
    parser.add_argument("--max-shard-size", default="2GB", help="split weights into files of at most this size (default: 2GB)")
    parser.add_argument("--lmssl-format", action="store_true",
                        help="write lmssl backbone weights + config instead of a transformers model")


def run(args: argparse.Namespace) -> int:
    from lmssl.export.core import export_run

    def log(msg: str) -> None:
        print(f"lmssl export: {msg}", file=sys.stderr if msg.startswith("note:") else sys.stdout)

    result = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite, license=args.license,
                        max_shard_size=args.max_shard_size, lmssl_format=args.lmssl_format,
                        card_name=args.push_to_hub, log=log)
    print(f"exported {args.run_dir} -> {result.out_dir} ({result.architecture})")
    if args.push_to_hub:
        from lmssl.export.hub import push_folder

        url = push_folder(result.out_dir, args.push_to_hub, args.private)
        print(f"pushed to {url}")
    return 0
