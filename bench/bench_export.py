"""Export a finished run and measure how far the shipped models are from the adapter on the base.

    python bench/bench_export.py --run outputs/demo            # after `prodtune run --config configs/demo.yaml`

Runs what users run: export_stage (merged + GGUF + Modelfile + card, timed, sizes from its report), then
compare_stage(which="merged") and compare_stage(which="gguf") on the run's test split. From the three
answers.csv files it reports, for the merged model and the GGUF against the adapter on the base:
  - the reference loss per item (teacher-forced: the cleanest view of a weight difference), mean and max |delta|;
  - the share of test items whose greedy answer is word-for-word the adapter's, and the ROUGE-L between the two
    answers where they differ;
  - each model's headline metrics with their 95% intervals.
Writes bench/results/export-<run>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def agreement(adapter, shipped) -> dict:
    """Answer and loss agreement between the adapter's comparison and a shipped model's (same items)."""
    import numpy as np
    from rouge_score import rouge_scorer

    a, s = adapter["tuned_answer"].tolist(), shipped["tuned_answer"].tolist()
    same = [x == y for x, y in zip(a, s, strict=True)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    differing = [scorer.score(x, y)["rougeL"].fmeasure for x, y, eq in zip(a, s, same) if not eq]
    delta = np.abs(adapter["tuned_loss"].to_numpy() - shipped["tuned_loss"].to_numpy())
    return {"identical_answers": sum(same), "items": len(same),
            "rouge_l_to_adapter_answer_where_different": round(float(np.mean(differing)), 4) if differing else None,
            "loss_abs_delta_mean": round(float(np.nanmean(delta)), 5), "loss_abs_delta_max": round(float(np.nanmax(delta)), 5)}


def headline(metrics: dict) -> dict:
    return {k: {"mean": round(metrics["tuned"][k]["mean"], 4), "ci95": [round(x, 4) for x in metrics["tuned"][k]["ci95"]]}
            for k in ("rouge_l", "chrf", "loss", "stop_rate") if k in metrics["tuned"]}


def main() -> None:
    import pandas as pd

    from prodtune.config import load_config
    from prodtune.evaluate import compare_stage
    from prodtune.export import export_stage
    from prodtune.io import RunPaths, read_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/demo", help="a finished run folder (train and compare done)")
    parser.add_argument("--formats", default="merged,gguf-q8_0,modelfile,card", help="export.formats to write")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/export-<run>.json)")
    args = parser.parse_args()

    paths = RunPaths(args.run)
    cfg = load_config(paths.config, [f"output_dir={paths.root}", f"export.formats={args.formats}"])
    started = time.time()
    report = export_stage(cfg)
    export_s = time.time() - started
    print(report["summary"], flush=True)
    timings = {}
    for which in ("merged", "gguf"):
        clock = time.time()
        print(compare_stage(cfg, which=which)["summary"], flush=True)
        timings[which] = round(time.time() - clock, 1)
    adapter = pd.read_csv(paths.answers_csv, keep_default_na=False)
    result = {
        "run": str(paths.root), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "export": {"seconds_total": round(export_s, 1), "seconds": report["seconds"],
                   "files_mib": {n: round(s / 2**20, 2) for n, s in report["files"].items()},
                   "merged_mib": round(sum(s for n, s in report["files"].items() if n.startswith("merged/")) / 2**20, 1)},
        "compare_seconds": timings,
        "adapter": headline(read_json(paths.metrics_json)),
    }
    for which in ("merged", "gguf"):
        folder = RunPaths(paths.root, "test", which)
        shipped = pd.read_csv(folder.answers_csv, keep_default_na=False)
        result[which] = {"vs_adapter": agreement(adapter, shipped), **headline(read_json(folder.metrics_json))}
    out = Path(args.out or ROOT / "bench" / "results" / f"export-{paths.root.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
