"""The ``lmssl`` command.

Each subcommand lives in a module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen one is imported, so ``lmssl --help`` is instant. A :class:`UserError`
anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "pretrain": ("lmssl.cli", "pretrain a model from a YAML recipe (+ key=value overrides); resumes automatically"),
    "tokenizer": ("lmssl.data.tokenizer", "train a BPE / Unigram / WordPiece tokenizer on your text"),
    "generate": ("lmssl.cli", "sample text from a trained decoder run"),
    "fill-mask": ("lmssl.cli", "show a masked-LM run's top-k fills for [MASK] / <mask> in a sentence"),
    "export": ("lmssl.export.cli", "export a run to a folder stock transformers loads (and push it to the Hub)"),
    "finetune": ("lmssl.finetune", "fine-tune a run or a transformers checkpoint on a labelled text or image task"),
    "probe": ("lmssl.probe", "linear probe and k-NN of frozen features beside the same network at initialisation"),
    "bench": ("lmssl.bench", "time lmssl against the transformers model of the same shape"),
    "zero-shot": ("lmssl.zero_shot", "classify images by label prompts with a CLIP run (default: its held-out set)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmssl COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        print("\n`lmssl COMMAND --help` for a command's options.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from lmssl import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"lmssl: unknown command '{name}'" + (f"; did you mean '{near[0]}'?" if near else "; see `lmssl --help`"),
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"lmssl {name}", description=COMMANDS[name][1])
    adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None) or module.add_arguments
    runner = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
    adder(parser)
    args = parser.parse_args(argv[1:])
    from lmssl.errors import UserError

    try:
        return int(runner(args) or 0)
    except UserError as e:
        print(f"lmssl {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmssl {name}: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- pretrain


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/gpt_tiny.yaml (or a recipe name such as gpt_tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=300")


def resolve_recipe(recipe: str) -> str:
    """A path, or the name of a shipped recipe (``gpt_tiny`` -> recipes/gpt_tiny.yaml)."""
    if os.path.exists(recipe):
        return recipe
    from lmssl.runs.recipes import recipe_path

    return str(recipe_path(recipe))


def run_pretrain(args: argparse.Namespace) -> int:
    from lmssl.config import load_config
    from lmssl.train.loop import train

    cfg = load_config(resolve_recipe(args.recipe), args.overrides)
    result = train(cfg)
    if result.get("main_process") and "eval_loss" in result:
        print_summary(cfg, result)
    return 0


def print_summary(cfg, result: dict) -> None:
    unit = next((u for u in ("images", "pairs") if f"{u}_seen" in result), "tokens")
    lines = ["", f"== {cfg.objective} run {cfg.train.output_dir}: step {result['step']}, "
                 f"{result.get(f'{unit}_seen', 0):,} {unit} seen =="]
    named = {"eval_loss": "held-out loss", "eval_perplexity": "perplexity", "eval_bits_per_byte": "bits per byte",
             "eval_accuracy": "held-out accuracy", "eval_knn_accuracy": "k-NN accuracy (monitor)",
             "eval_probe_accuracy": "online probe accuracy"}
    from lmssl import objectives

    named.update({f"eval_{k}": v for k, v in objectives.get(cfg.objective).metric_names.items()})
    # every held-out metric the objective reports (CPC adds one accuracy per offset), then speed
    keys = list(named) + sorted(k for k in result if k.startswith("eval_") and k not in named)
    speed = f"{unit}_per_s"
    for key in keys + [speed, "mfu"]:
        if key not in result or not isinstance(result[key], (int, float)):
            continue
        value = result[key]
        label = named.get(key) or {speed: f"{unit}/s (last window)", "mfu": "MFU"}.get(key) or \
            "held-out " + key[len("eval_"):].replace("_", " ")
        if key == "mfu" or "acc" in key or "chance" in key:
            lines.append(f"  {label:<24} {value:.2%}")
        elif key == speed or key.endswith("tokens"):
            lines.append(f"  {label:<24} {value:,.0f}")
        else:
            lines.append(f"  {label:<24} {value:,.4f}")
    if result.get("report"):
        lines += ["", result["report"]]
    if result.get("loss_curve"):
        lines += ["", f"loss curve: {result['loss_curve']}"]
    lines.append(f"checkpoints: {cfg.train.output_dir}/checkpoints (run the same command again to resume)")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- generate


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's train.output_dir")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="0 disables top-k filtering")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 disables)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from lmssl.errors import UserError
    from lmssl.runs import load_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, tokenizer = load_run(args.run_dir, device)
    if not callable(getattr(model, "generate", None)):
        raise UserError(f"{args.run_dir} is a '{cfg.objective}' run, which does not generate text; generate needs a "
                        "causal LM (objective clm)")
    for i in range(args.num_samples):
        text = model.generate(tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed + i)
        print(text if args.num_samples == 1 else f"--- sample {i + 1}\n{text}")
    return 0


# ----------------------------------------------------------------------------- `lmssl fill-mask`


def add_fill_mask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a masked-LM run's train.output_dir")
    parser.add_argument("text", help='text with [MASK] or <mask> where words are missing, e.g. "The [MASK] sat."')
    parser.add_argument("--top-k", type=int, default=5, help="fills shown per mask (default: 5)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run the model (default: cuda when available)")


def run_fill_mask(args: argparse.Namespace) -> int:
    import torch

    from lmssl import objectives
    from lmssl.errors import UserError
    from lmssl.objectives.mlm import show_piece, split_on_masks
    from lmssl.runs import load_run, run_objective

    name = run_objective(args.run_dir)  # refuse other objectives before loading any weights
    if name is not None and name in objectives.names() and not hasattr(objectives.get(name), "fill_mask"):
        raise UserError(f"{args.run_dir} is a '{name}' run; fill-mask needs a masked-LM run (objective mlm)")
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, cfg, tokenizer = load_run(args.run_dir, device)
    fills = model.fill_mask(tokenizer, args.text, args.top_k)
    pieces = split_on_masks(tokenizer, args.text)
    others = [" [MASK]" if raw.endswith(" ") else "[MASK]" for raw in split_on_masks(tokenizer, args.text, False)]
    print(args.text)
    for m, row in enumerate(fills):
        print(f"mask {m + 1} of {len(fills)}:")
        for rank, (token, prob) in enumerate(row, start=1):
            filled = pieces[0] + "".join((token if j == m else others[j]) + pieces[j + 1] for j in range(len(fills)))
            print(f"  {rank:>2}. {show_piece(token):<16} {prob:7.4f}   {filled}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
