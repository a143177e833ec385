"""prodtune's command line: one subcommand per stage, all reading one config.

    prodtune clean   --config configs/demo.yaml [key=value ...]
    prodtune format  --config configs/demo.yaml
    prodtune train   --config configs/demo.yaml [--resume]
    prodtune compare --config configs/demo.yaml [--model merged|gguf]
    prodtune export  --config configs/demo.yaml [export.formats=merged,gguf-q8_0,modelfile,card]
    prodtune run     --config configs/demo.yaml        (all stages, skipping finished ones)
    prodtune push    --run outputs/demo --repo USER/NAME [--what adapter|merged|gguf] [--private] [--dry-run]
    prodtune ask "Mog's Kittens" --run outputs/demo [--base]
    prodtune config  --config configs/demo.yaml        (print the resolved config)

User errors print one line and exit 1; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from prodtune.errors import UserError
from prodtune.io import COMPARE_MODELS, COMPARE_SPLITS

# stage name -> (module, function, one-line help). Imported lazily so --help stays instant.
STAGES: dict[str, tuple[str, str, str]] = {
    "clean": ("prodtune.clean", "clean_stage",
              "Stage 1: clean the raw trn.json into clean/clean.parquet and clean_report.json."),
    "format": ("prodtune.prompts", "format_stage",
               "Stage 2: turn clean rows into prompt-completion JSONL splits under format/."),
    "train": ("prodtune.train", "train_stage",
              "Stage 3: LoRA/QLoRA fine-tuning with TRL's SFTTrainer; writes train/adapter."),
    "compare": ("prodtune.evaluate", "compare_stage",
                "Stage 4: base vs tuned answers on the held-out test split, metrics and a report."),
    "export": ("prodtune.export", "export_stage",
               "Ship the tuned model into export/: merged safetensors, GGUF, Ollama Modelfile, model card "
               "(export.formats)."),
    "run": ("prodtune.pipeline", "run_pipeline",
            "Every stage in order; a stage already finished with the same config is skipped."),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides typed as YAML, e.g. train.learning_rate=1e-4 data.sample_size=200")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prodtune",
        description="Fine-tune a small instruction model to describe e-commerce products "
                    "(AmazonTitles-1.3MM) with LoRA/QLoRA, and measure it against the base model.",
        epilog="Run 'prodtune config --fields' to list every config key with its default and meaning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the last checkpoint in train/checkpoints")
        if name == "run":
            p.add_argument("--force", action="store_true", help="redo every stage even when finished")
        if name == "compare":
            p.add_argument("--split", choices=COMPARE_SPLITS, default="test",
                           help="validation: compare on format/validation.jsonl into compare-validation/, "
                                "to choose eval settings without looking at the test split")
            p.add_argument("--model", default="adapter", metavar="|".join(COMPARE_MODELS),
                           help="the tuned model to score: the adapter on the base (compare/), or what export "
                                "shipped: merged (compare-merged/), gguf (the first GGUF; gguf-<type> for another)")
    p = sub.add_parser("ask", help="One answer from the tuned (or base) model of a finished run.",
                       description="One answer from the tuned (or base) model of a finished run.")
    p.add_argument("question", help="a question, or just a product title")
    p.add_argument("--run", required=True, help="run folder, e.g. outputs/demo")
    p.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override eval.max_new_tokens")
    help_text = "Upload a run's adapter, merged model or GGUF files to the Hugging Face Hub in one commit."
    p = sub.add_parser("push", help=help_text, description=help_text + " The token is HF_TOKEN or the saved login.")
    p.add_argument("--run", required=True, help="run folder, e.g. outputs/demo")
    p.add_argument("--repo", required=True, help="Hub model repo, USER/NAME (created if missing)")
    p.add_argument("--what", choices=["adapter", "merged", "gguf"], default="adapter",
                   help="adapter: train/adapter; merged: export/merged; gguf: export/*.gguf and the Modelfile")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="list every file and the target; send nothing")
    p = sub.add_parser("config", help="Print the resolved config (YAML), or every key with --fields.",
                       description="Print the resolved config (YAML), or every key with --fields.")
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every key, its default and meaning")
    return parser


def _call(module: str, func: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prodtune` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"prodtune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prodtune {args.command}: interrupted; finished outputs are kept "
              "(train: rerun with --resume)", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from prodtune.config import describe_fields, load_config, to_dict

    if args.command == "ask":
        answer = _call("prodtune.generate", "ask")(args.question, run_dir=args.run, base=args.base,
                                                   max_new_tokens=args.max_new_tokens)
        print(answer)
        return 0
    if args.command == "push":
        result = _call("prodtune.push", "push")(args.run, args.repo, what=args.what, private=args.private,
                                                dry_run=args.dry_run)
        print(result["summary"])
        return 0
    if args.command == "config" and args.fields:
        print(describe_fields())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    module, func, _ = STAGES[args.command]
    kwargs: dict[str, Any] = {}
    if args.command == "train":
        kwargs["resume"] = args.resume
    if args.command == "run":
        kwargs["force"] = args.force
    if args.command == "compare" and args.split != "test":
        kwargs["split"] = args.split
    if args.command == "compare" and args.model != "adapter":
        kwargs["which"] = args.model
    from prodtune.distributed import launched_processes

    launched = launched_processes()
    if launched > 1 and args.command != "train":
        raise UserError(f"'prodtune {args.command}' runs in one process; under accelerate launch "
                        f"({launched} processes) launch only 'prodtune train', the other stages as plain commands")
    started = time.time()
    result = _call(module, func)(cfg, **kwargs)
    if args.command in ("clean", "format", "train", "compare", "export") and not (kwargs.get("split") or kwargs.get("which")):
        # So that a later `prodtune run` knows this stage is finished with this config.
        from prodtune.distributed import is_main_process
        from prodtune.pipeline import mark_finished

        if is_main_process():
            mark_finished(cfg, args.command, round(time.time() - started, 1))
    if isinstance(result, dict) and result.get("summary"):
        print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
