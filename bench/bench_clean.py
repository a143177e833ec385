"""Benchmark: prodtune's clean stage against the straightforward pandas approach.

    python bench/bench_clean.py                    # 1.3M generated rows, each approach once
    python bench/bench_clean.py --rows 200000 --repeat 3 --keep
    python bench/bench_clean.py --format parquet   # the same rows as parquet (or csv)

Generates N raw rows with prodtune.synth (cached under /tmp/prodtune-bench, reused; trn.json lines,
or with --format the same rows as CSV or parquet), then cleans them with each approach in its
own subprocess, so that peak memory is per approach:
  prodtune  prodtune.clean.clean_data (every rule, file-wide dedupe, parquet)
  pandas    pd.read_json(lines=True) / read_csv / read_parquet, regex tag strip, html.unescape,
            strip, drop empty, parquet
Peak memory is polled from /proc over the approach's whole process tree (its worker processes
too): RSS summed over the processes (an upper bound: pages shared after fork count twice) and
PSS (shared pages split between the processes that share them). "seconds" is the cleaning
time inside the child, "CPU s" the CPU time of its process tree: on a shared, busy machine the
second tells more about the code than the first. Prints a table and writes
bench/results/clean-<host>[-<format>].json (or --out). The target: 1.3M rows in <= 60 s, peak <= 1.5 GiB,
>= 5x the pandas rows/s, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / "prodtune-bench"
GIB = 1 << 30


# ----------------------------------------------------------------------------- the approaches (in a child)

def run_prodtune(raw: str, out: str, workers: int) -> dict:
    from prodtune.config import DataConfig
    from prodtune.clean import clean_data

    start = time.perf_counter()
    report = clean_data(DataConfig(raw_path=raw, clean_workers=workers), out, progress=False)
    return {"seconds": time.perf_counter() - start, "rows": report["rows_read"], "kept": report["rows_kept"],
            "workers": report["workers"]}


def run_pandas(raw: str, out: str, workers: int) -> dict:
    import html

    import pandas as pd

    start = time.perf_counter()
    if raw.endswith(".parquet"):
        df = pd.read_parquet(raw, columns=["uid", "title", "content"])
    elif raw.endswith(".csv"):
        df = pd.read_csv(raw, dtype=str, keep_default_na=False)
    else:
        df = pd.read_json(raw, lines=True)
    rows = len(df)
    for col in ("title", "content"):
        df[col] = (df[col].astype(str).str.replace(r"<[^>]+>", "", regex=True)
                   .map(html.unescape).str.strip())
    df = df[(df["title"] != "") & (df["content"] != "")]
    df[["uid", "title", "content"]].astype(str).to_parquet(Path(out) / "clean.parquet", index=False)
    return {"seconds": time.perf_counter() - start, "rows": rows, "kept": len(df), "workers": 1}


APPROACHES = {"prodtune": run_prodtune, "pandas": run_pandas}


def child_main(name: str, raw: str, out: str, workers: int) -> None:
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu0 = sum(u.ru_utime + u.ru_stime for u in usage)
    result = APPROACHES[name](raw, out, workers)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage) - cpu0  # worker processes included
    biggest = max(u.ru_maxrss for u in usage) * 1024
    print(json.dumps(result | {"cpu_seconds": cpu, "max_rss_one_process": biggest}))


# ----------------------------------------------------------------------------- memory of a process tree

def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _memory(pids: list[int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes."""
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def measure(name: str, raw: Path, out: Path, workers: int) -> dict:
    """Run one approach in a subprocess, polling its process tree's memory every 50 ms."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--_child", name, "--_raw", str(raw), "--_out", str(out),
           "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def poll() -> None:
        while proc.poll() is None:
            rss, pss = _memory(_tree(proc.pid))
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return result | {"approach": name, "wall_seconds": wall, "rows_per_second": result["rows"] / result["seconds"],
                     "peak_rss_tree": peak[0], "peak_pss_tree": peak[1]}


# ----------------------------------------------------------------------------- main

def raw_file(rows: int, seed: int, fmt: str = "json") -> Path:
    from prodtune.synth import VERSION, write_raw, write_table

    path = CACHE / f"trn-{rows}-s{seed}-v{VERSION}.{fmt}"
    if path.is_file():
        print(f"input: {path} (cached, {path.stat().st_size / 2**20:.0f} MiB)")
        return path
    start = time.perf_counter()
    (write_raw if fmt == "json" else write_table)(path, rows, seed)
    print(f"input: {path} ({path.stat().st_size / 2**20:.0f} MiB, generated in "
          f"{time.perf_counter() - start:.1f} s)")
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def table(results: list[dict]) -> str:
    head = f"{'approach':<10} {'rows':>10} {'kept':>10} {'seconds':>8} {'CPU s':>7} {'rows/s':>10} " \
           f"{'rows/CPU s':>10} {'peak RSS':>9} {'peak PSS':>9} {'1 proc':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['approach']:<10} {r['rows']:>10,} {r['kept']:>10,} {r['seconds']:>8.1f} "
                     f"{r['cpu_seconds']:>7.1f} {r['rows_per_second']:>10,.0f} "
                     f"{r['rows'] / r['cpu_seconds']:>10,.0f} "
                     f"{r['peak_rss_tree'] / GIB:>7.2f} G {r['peak_pss_tree'] / GIB:>7.2f} G "
                     f"{r['max_rss_one_process'] / GIB:>6.2f} G")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_300_000, help="rows to generate (default 1.3M)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--repeat", type=int, default=1, help="runs per approach; the fastest is reported")
    p.add_argument("--workers", type=int, default=0, help="data.clean_workers for prodtune (0 = auto)")
    p.add_argument("--only", choices=sorted(APPROACHES), help="run one approach")
    p.add_argument("--format", choices=["json", "csv", "parquet"], default="json",
                   help="input format: trn.json lines (default), or the same rows as CSV or parquet")
    p.add_argument("--out", help="results file (default bench/results/clean-<host>[-<format>].json)")
    p.add_argument("--keep", action="store_true", help="keep the cleaned outputs (the input stays cached)")
    p.add_argument("--_child"), p.add_argument("--_raw"), p.add_argument("--_out")
    args = p.parse_args()
    if args._child:
        return child_main(args._child, args._raw, args._out, args.workers)

    raw = raw_file(args.rows, args.seed, args.format)
    out_root = Path(tempfile.mkdtemp(prefix="prodtune-bench-out-"))
    load_before = os.getloadavg()
    results = []
    for name in [args.only] if args.only else ["prodtune", "pandas"]:
        runs = [measure(name, raw, out_root / f"{name}-{i}", args.workers) for i in range(args.repeat)]
        best = min(runs, key=lambda r: r["seconds"])
        results.append(best | {"runs_seconds": [round(r["seconds"], 2) for r in runs]})
    load_after = os.getloadavg()
    print(table(results))
    by = {r["approach"]: r for r in results}
    ratio = None
    if len(by) == 2:
        ratio = by["prodtune"]["rows_per_second"] / by["pandas"]["rows_per_second"]
        cpu_ratio = by["pandas"]["cpu_seconds"] / by["prodtune"]["cpu_seconds"]
        print(f"speed ratio prodtune / pandas: {ratio:.1f}x rows/s (wall), "
              f"{cpu_ratio:.1f}x rows per CPU second")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"on {os.cpu_count()} CPUs ({cpu_name()})")

    host = socket.gethostname() or cpu_name().replace(" ", "-")
    suffix = "" if args.format == "json" else f"-{args.format}"
    dest = Path(args.out) if args.out else HERE / "results" / f"clean-{host}{suffix}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": host, "cpu": cpu_name(), "cpus": os.cpu_count(),
        "load_average_before_after": [load_before[0], load_after[0]], "python": platform.python_version(),
        "input": str(raw), "input_bytes": raw.stat().st_size, "format": args.format, "rows": args.rows,
        "seed": args.seed,
        "repeat": args.repeat, "results": results, "speed_ratio": ratio,
        "cpu_ratio": (by["pandas"]["cpu_seconds"] / by["prodtune"]["cpu_seconds"]) if ratio else None,
    }, indent=2) + "\n")
    print(f"results: {dest}")
    if args.keep:
        print(f"outputs kept in {out_root}")
    else:
        import shutil

        shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
