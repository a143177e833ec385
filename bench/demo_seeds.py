"""How much of the demo's base-vs-tuned result is the split: the demo on several data seeds.

The demo compares on 30 held-out products, so one split's difference carries a wide interval and
the luck of the split. This reruns `make demo`'s pipeline with other `data.seed` values (each
seed is a different train / validation / test split of the same 275 clean records, and a fresh
training run) and compares each run on its test and validation splits at several
`eval.min_new_tokens`, then prints one table:

    python bench/demo_seeds.py --seeds 3407 1 2 3 4 --min-new-tokens 64 96
    python bench/demo_seeds.py --summarize-only          # the table from finished runs

Each seed costs one training run (~6 min on the 2-core CPU) plus two comparisons per setting
(~1 min each). Runs live in outputs/demo-seeds/s<seed>/ (each comparison's metrics kept there as
metrics-<split>-min<N>.json and not redone); a finished stage is skipped on a rerun (copy
outputs/demo to outputs/demo-seeds/s3407 to reuse the demo's own run). Results:
bench/results/demo-seeds.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("rouge_l", "chrf")


def prodtune(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "prodtune", *args]
    with log.open("w") as fh:
        if subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)} (log: {log})")


def run_seed(seed: int, runs: Path, min_tokens: list[int], config: str) -> dict:
    run = runs / f"s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    prodtune("run", "--config", config, f"data.seed={seed}", f"output_dir={run}", log=run / "run.log")
    out: dict = {"seed": seed, "n_test": None, "n_validation": None, "results": {}}
    for m in min_tokens:
        for split in ("validation", "test"):
            kept = run / f"metrics-{split}-min{m}.json"  # compare/ holds only the latest setting
            if not kept.is_file():
                prodtune("compare", "--config", config, f"data.seed={seed}", f"output_dir={run}",
                         f"eval.min_new_tokens={m}", "--split", split, log=run / f"compare-{split}-{m}.log")
                folder = run / ("compare" if split == "test" else "compare-validation")
                kept.write_bytes((folder / "metrics.json").read_bytes())
            metrics = json.loads(kept.read_text())
            out[f"n_{split}"] = metrics["n"]
            out["results"][f"{split}/min{m}"] = {k: metrics["diff"][k] for k in METRICS}
        print(f"seed {seed}, min_new_tokens {m}: done", flush=True)
    return out


def fmt(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.3f} ({lo:+.3f}, {hi:+.3f})" if abs(d["mean"]) < 1 else f"{d['mean']:+.2f} ({lo:+.2f}, {hi:+.2f})"


def table(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r["results"]}, key=lambda k: (k.split("/")[0] != "test", k))
    lines = ["| seed | items (test / val) | " + " | ".join(f"{k} {m}" for k in keys for m in ("ROUGE-L", "chrF")) + " |",
             "| --- | --- | " + " | ".join("---" for _ in keys for _ in METRICS) + " |"]
    for r in rows:
        cells = [fmt(r["results"][k][m]) if k in r["results"] else "" for k in keys for m in METRICS]
        lines.append(f"| {r['seed']} | {r['n_test']} / {r['n_validation']} | " + " | ".join(cells) + " |")
    means = []
    for k in keys:
        for m in METRICS:
            vals = [r["results"][k][m]["mean"] for r in rows if k in r["results"]]
            above = sum(r["results"][k][m]["ci95"][0] > 0 for r in rows if k in r["results"])
            means.append(f"mean {sum(vals) / len(vals):+.3f}, {above}/{len(vals)} CI > 0")
    lines.append("| all | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3407, 1, 2, 3, 4])
    ap.add_argument("--min-new-tokens", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--runs", default="outputs/demo-seeds")
    ap.add_argument("--out", default="bench/results/demo-seeds.json")
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    out = ROOT / args.out
    done = {r["seed"]: r for r in json.loads(out.read_text())["runs"]} if out.is_file() else {}
    if not args.summarize_only:
        for seed in args.seeds:
            done[seed] = run_seed(seed, ROOT / args.runs, args.min_new_tokens, args.config)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"config": args.config, "metric": "tuned - base (95% CI)",
                                       "runs": list(done.values())}, indent=1))
            tmp.replace(out)
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
