"""prodtune's command line: one subcommand per stage, all reading one config.

    prodtune clean   --config configs/demo.yaml [key=value ...]
    prodtune format  --config configs/demo.yaml
    prodtune train   --config configs/demo.yaml [--resume]
    prodtune compare --config configs/demo.yaml [--model merged|gguf]
    prodtune export  --config configs/demo.yaml [export.formats=merged,gguf-q8_0,modelfile,card]
    prodtune run     --config configs/demo.yaml        (all stages, skipping finished ones)
    prodtune push    --run outputs/demo --repo USER/NAME [--what adapter|merged|gguf] [--private] [--dry-run]
    prodtune ask "Mog's Kittens" --run outputs/demo [--base] [--context brand=Acme ...]
    prodtune config  --config configs/demo.yaml        (print the resolved config)

Errors print one line and exit 1 (with --debug, the full traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prodtune import stages
from prodtune.config import describe_fields, load_config, to_dict
from prodtune.distributed import launched_processes
from prodtune.errors import UserError
from prodtune.generate import ask
from prodtune.io import COMPARE_MODELS, COMPARE_SPLITS
from prodtune.pipeline import run_pipeline
from prodtune.push import PUSH_WHAT, push

# Commands beside the stages of prodtune.stages.STAGES, each taking --config and overrides.
COMMANDS: dict[str, str] = {
    "run": "Every stage in order; a stage already finished with the same config is skipped.",
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    helps = {stage.name: stage.help for stage in stages.STAGES} | COMMANDS
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
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
                       description="One answer from the tuned (or base) model of a finished run.",
                       parents=[common])
    p.add_argument("question", help="a question, or just a product title")
    p.add_argument("--run", required=True, help="run folder, e.g. outputs/demo")
    p.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override eval.max_new_tokens")
    p.add_argument("--context", action="append", default=[], metavar="FIELD=VALUE",
                   help="a context field of the product, as in training (repeat it: --context brand=Acme "
                        "--context category=Toys)")
    help_text = "Upload a run's adapter, merged model or GGUF files to the Hugging Face Hub in one commit."
    p = sub.add_parser("push", help=help_text, description=help_text + " The token is HF_TOKEN or the saved login.",
                       parents=[common])
    p.add_argument("--run", required=True, help="run folder, e.g. outputs/demo")
    p.add_argument("--repo", required=True, help="Hub model repo, USER/NAME (created if missing)")
    p.add_argument("--what", choices=PUSH_WHAT, default="adapter",
                   help="adapter: train/adapter; merged: export/merged; gguf: export/*.gguf and the Modelfile")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="list every file and the target; send nothing")
    p = sub.add_parser("config", help="Print the resolved config (YAML), or every key with --fields.",
                       description="Print the resolved config (YAML), or every key with --fields.",
                       parents=[common])
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every key, its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prodtune` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"prodtune {args.command}: interrupted; finished outputs are kept "
              "(train: rerun with --resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"prodtune {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: Exception) -> str:
    """A user error as it is; an OS or library error as one line naming the path and the fix."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f" '{e.filename}'" if e.filename else ""
        return (f"{e.strerror}{where}; check the path and its permissions, or the disk's free space "
                "(--debug shows the traceback)")
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"{type(e).__name__}: {first} (unexpected: rerun with --debug for the traceback, "
            "and report it if the settings look right)")


def _context_args(items: list[str]) -> dict[str, str]:
    """--context FIELD=VALUE options as a dict."""
    context = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--context {item!r}: write FIELD=VALUE, e.g. --context brand=Acme")
        context[name.strip()] = value.strip()
    return context


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "ask":
        print(ask(args.question, run_dir=args.run, base=args.base, max_new_tokens=args.max_new_tokens,
                  context=_context_args(args.context)))
        return 0
    if args.command == "push":
        result = push(args.run, args.repo, what=args.what, private=args.private, dry_run=args.dry_run)
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
    launched = launched_processes()
    if launched > 1 and args.command != "train":
        raise UserError(f"'prodtune {args.command}' runs in one process; under accelerate launch "
                        f"({launched} processes) launch only 'prodtune train', the other stages as plain commands")
    if args.command == "run":
        result = run_pipeline(cfg, force=args.force)
    else:
        kwargs: dict[str, Any] = {}
        if args.command == "train":
            kwargs["resume"] = args.resume
        if args.command == "compare" and args.split != "test":
            kwargs["split"] = args.split
        if args.command == "compare" and args.model != "adapter":
            kwargs["which"] = args.model
        result = stages.run_stage(cfg, args.command, **kwargs)
    if isinstance(result, dict) and result.get("summary"):
        print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
