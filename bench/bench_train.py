"""Training throughput of prodtune's GPU paths against the plain QLoRA recipe (issue 6).

    python bench/bench_train.py                       # Phi-3-mini shape, random weights, on the GPU
    python bench/bench_train.py --tiny                # tiny Phi-3 on the CPU: checks the script runs
    python bench/bench_train.py --configs reference,fast --steps 8 --out /tmp/results
    python bench/bench_train.py --gpus 1,2,4          # data-parallel scaling of the fast path (issue 7)
    python bench/bench_train.py --tiny --gpus 1,2     # the same on the CPU, 2 gloo processes: a check

Each configuration runs in its own process (clean peak memory, own compile caches) on the same
random model (saved once, bf16 safetensors, loaded 4-bit like prodtune's train stage loads it),
the same synthetic pre-tokenized prompt/completion examples (AmazonTitles-like: ~240 tokens, loss
on the completion only) and the same TRL SFTTrainer setup train.py builds; the speed paths add
`prodtune.fast`'s plan, SFTConfig overrides and model preparation. Printed per configuration:
non-padding tokens/s over the timed steps, mean step time, peak GPU memory, and MFU =
tokens/s x F x N / 790 TFLOP/s with N = 3.82e9 and F = 4 + 2 x (share of checkpointed layers)
(2N forward + 2N backward for a frozen base + 2N recomputed forward where checkpointed), and a
probe loss: the loss of every configuration on the same 8 examples before training.
Results: <out>/train-<card>.json (default bench/results/).

Scaling (--gpus 1,2,4; bench/run_multi.sh): one configuration (default `fast`, prodtune's default
GPU path) launched with `accelerate launch --num_processes N` on the first N GPUs, N from the
list. The global batch is kept as `prodtune train` keeps it (16k tokens per optimizer step split
over the GPUs, prodtune.distributed.split_batch), so every count trains the same samples and the
loss after warmup + steps optimizer steps is comparable; --per-gpu-batch keeps each GPU's
one-GPU micro-batch instead (the global batch grows with N: weak scaling, to separate the cost of
smaller micro-batches from the cost of communication). Printed per count: tokens/s over all GPUs,
speed-up and scaling efficiency (tokens/s / (N x one-GPU tokens/s)), step time, per-GPU
micro-batch, peak memory of each GPU, the loss at the last step and its difference to one GPU.
Results: <out>/scaling-<card>-x<N>.json, all logs in <out>/log-scaling.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

N_PARAMS = 3.82e9
DEFAULT_STEP = 16384  # train.step_tokens' default: results at other step sizes are named and grouped apart
PEAK_FLOPS = 790e12  # bf16 dense matmul measured on this workplace's H100 and H200 (KINDS.md)

# name -> (train config overrides, SpeedPlan overrides). The plan is what fast.plan picks for the
# card, then these knobs; "reference" is the original recipe on TRL as is.
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "reference": ({"speed": "plain", "batch_size": 2, "grad_accum": 4, "packing": False,
                   "gradient_checkpointing": True}, {}),
    "fast": ({"speed": "auto"}, {}),  # the default for the card (H100/H200: every other layer checkpointed)
    "fast-eager": ({"speed": "fast"}, {"compile": False, "checkpoint_every": 0}),  # as in run 1
    "fast-ckpt": ({"speed": "fast"}, {"checkpoint_every": 1}),
    "fast-ckpt2": ({"speed": "fast"}, {"checkpoint_every": 2}),
    # Compiled without checkpointing: never finished compiling within 150 s on the H200 (twice).
    "fast-nockpt": ({"speed": "fast"}, {"checkpoint_every": 0}),
    "fast-nockpt-8k": ({"speed": "fast"}, {"checkpoint_every": 0, "rows": 4, "grad_accum": 2}),
    "fast-4bit": ({"speed": "fast"}, {"dequantize_once": False, "compile": False}),
    "small": ({"speed": "small"}, {}),
}


# ----------------------------------------------------------------------------- data and model

def synthetic_examples(n: int, vocab: int, scale: float, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pre-tokenized prompt/completion examples with AmazonTitles-like lengths (scale=1: prompt
    ~75 tokens, completion ~165, total ~240) and random token ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = max(4, int(rng.integers(55, 96) * scale))
        c = max(4, int(np.clip(rng.lognormal(np.log(140), 0.6), 8, 1500) * scale))
        ids = rng.integers(10, vocab, p + c).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * p + [1] * c})
    return rows


def make_model_dir(folder: Path, tiny: bool) -> Path:
    """A random-weight Phi-3 (mini's exact shape, or tests/tiny.py's) with the tiny tokenizer."""
    import torch
    from tiny import build_phi3, build_tokenizer
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = build_tokenizer()
    if tiny:
        model = build_phi3(tok)
    else:
        config = Phi3Config(pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end|>"),
                            bos_token_id=tok.eos_token_id)  # defaults are Phi-3-mini-4k's shape
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if not tiny:
        torch.cuda.empty_cache()  # GPU 0 is the workers' from here on
    return folder


# ----------------------------------------------------------------------------- one configuration

def run_config(name: str, model_dir: Path, tiny: bool, warmup: int, steps: int, n_examples: int,
               scaling: bool = False, per_gpu_batch: bool = False, step_tokens: int = DEFAULT_STEP) -> dict | None:
    """Time one configuration in this process (one rank of several under accelerate launch);
    the result on rank 0, None on the others."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from prodtune import distributed, fast, models
    from prodtune.config import LoraConfig, ModelConfig, TrainConfig

    processes = distributed.world_size()  # joins the process group under accelerate launch
    t0 = time.perf_counter()

    def mark(what: str) -> None:  # where a launch's time goes (model load, compile, ...), in its log
        print(f"[rank {distributed.process_index()} +{time.perf_counter() - t0:.1f} s] {what}", flush=True)
    train_over, plan_over = CONFIGS[name]
    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    train_cfg = dataclasses.replace(TrainConfig(max_length=256 if tiny else 2048, device=device,
                                                step_tokens=step_tokens), **train_over)
    model_cfg = ModelConfig(name_or_path=str(model_dir), load_in_4bit=True,
                            dtype="auto" if cuda else "float32")
    lora_cfg = LoraConfig()  # r=32, alpha=64, all-linear

    if cuda:
        speed = fast.plan(train_cfg, model_cfg, device)
    else:
        # No speed path on a CPU: exercise the same components with the CPU's attention and dtype.
        speed = (fast.SpeedPlan("plain", "cpu") if train_cfg.speed == "plain" else
                 fast.SpeedPlan("fast", "cpu check", rows=2, max_length=train_cfg.max_length,
                                grad_accum=max(1, step_tokens // DEFAULT_STEP),  # split over processes as on GPUs
                                dequantize_once=True, attn_implementation="sdpa"))
    if plan_over and speed.path != "plain":
        speed = dataclasses.replace(speed, **plan_over)
    # Several processes share one optimizer step as `prodtune train` does (train.make_plan),
    # unless --per-gpu-batch keeps the one-GPU micro-batch on every GPU.
    if speed.path != "plain":
        split = distributed.split_batch(speed.rows, speed.grad_accum, 1 if per_gpu_batch else processes)
        speed = dataclasses.replace(speed, rows=split.per_device, grad_accum=split.accum)
    else:
        split = distributed.split_batch(train_cfg.batch_size, train_cfg.grad_accum,
                                        1 if per_gpu_batch else processes)
        train_cfg = dataclasses.replace(train_cfg, batch_size=split.per_device, grad_accum=split.accum)
    ckpt = speed.checkpoint_every > 0 if speed.path != "plain" else bool(train_cfg.gradient_checkpointing)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = models.load_model(model_cfg, device, training=True, gradient_checkpointing=ckpt, path=str(model_dir))
    mark("model loaded")
    vocab = model.config.vocab_size
    from datasets import Dataset

    if per_gpu_batch:
        n_examples *= processes  # N times the tokens per step: the same number of steps per epoch
    n_examples = n_examples * max(1, step_tokens // DEFAULT_STEP)  # likewise for bigger steps
    data = Dataset.from_list(synthetic_examples(n_examples, vocab, 0.25 if tiny else 1.0))
    probe = synthetic_examples(8, vocab, 0.25 if tiny else 1.0, seed=1)
    targets = models.resolve_lora_targets(model, lora_cfg.target_modules)
    t = train_cfg
    args = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-train-"),
        max_steps=warmup + steps + (1 if os.environ.get("BENCH_PROFILE") == name and cuda else 0),
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, optim=t.optim if cuda else "adamw_torch", max_grad_norm=t.max_grad_norm,
        seed=t.seed, max_length=t.max_length, packing=False, completion_only_loss=True,
        gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        bf16=cuda, fp16=False, use_cpu=not cuda, logging_steps=1 if scaling else 10**6, eval_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, **distributed.DDP_ARGS)
    args.update(fast.sft_overrides(speed, train_cfg))
    if not cuda and speed.path != "plain":
        args["gradient_checkpointing"], args["gradient_checkpointing_kwargs"] = False, None
    trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data, processing_class=tok,
                         peft_config=models.peft_lora_config(lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, targets))
    prepared = fast.prepare(trainer.model, speed) if speed.path != "plain" else {}

    counts: list[int] = []
    collate = trainer.data_collator

    def counting_collator(features: list[dict]) -> dict:
        counts.append(sum(len(f["input_ids"]) for f in features))  # real tokens, before padding
        return collate(features)

    trainer.data_collator = counting_collator

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.marks.append(time.perf_counter())
            if len(self.marks) <= 3:
                mark(f"step {state.global_step} done")

    class Losses(TrainerCallback):
        """The training loss of each optimizer step (the Trainer's mean over all processes)."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 5))

    timer, losses = Timer(), Losses()
    trainer.add_callback(timer)
    trainer.add_callback(losses)
    if os.environ.get("BENCH_PROFILE") == name and cuda:
        trainer.add_callback(Profiler(warmup + steps))  # one more step, after the timed ones

    mark("trainer ready")
    probe_loss = probe_batch_loss(trainer, collate, probe, cuda)
    mark("probe done (first compile)")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    mark("trained")
    wall = time.perf_counter() - started

    accum = args["gradient_accumulation_steps"]
    marks = timer.marks  # DDP's all-reduce in every backward keeps the processes in step
    timed = marks[warmup + steps] - marks[warmup]
    n_steps = warmup + steps
    # Real tokens of the timed steps and of all steps, summed over the processes.
    tokens = sum(distributed.gather(sum(counts[warmup * accum:n_steps * accum])))
    trained = sum(distributed.gather(sum(counts[:n_steps * accum])))
    peaks = distributed.gather((round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                round(torch.cuda.max_memory_reserved() / 2**30, 2)) if cuda else (None, None))
    if not distributed.is_main_process():
        return None
    tps = tokens / timed
    factor = speed.flops_factor if speed.path != "plain" else (6.0 if ckpt else 4.0)
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "config": name,
        "plan": speed.describe(),
        "prepared": prepared,
        "processes": processes,
        "per_device_batch": split.per_device, "grad_accum": split.accum, "global_batch": split.global_batch,
        "per_gpu_batch_kept": per_gpu_batch, "step_tokens": step_tokens,
        "tokens_per_s": round(tps, 1),
        "step_s": round(timed / steps, 4),
        "tokens_per_step": round(tokens / steps, 1),
        "step_times_s": [round(s, 3) for s in step_times],
        "peak_alloc_gib": max((a for a, _ in peaks), default=None) if cuda else None,
        "peak_reserved_gib": max((r for _, r in peaks), default=None) if cuda else None,
        "peak_alloc_gib_per_gpu": [a for a, _ in peaks] if cuda else None,
        "flops_per_token": f"{factor:g}N",
        "mfu": round(tps * factor * N_PARAMS / PEAK_FLOPS / processes, 4),  # per GPU
        "probe_loss": probe_loss,
        "losses": losses.losses,
        "final_loss": losses.losses[-1] if losses.losses else None,
        "tokens_trained": trained,  # over all warmup + timed steps: the samples behind final_loss
        "warmup_steps": warmup, "timed_steps": steps, "wall_s": round(wall, 1),
    }


def Profiler(step: int) -> Any:
    """A callback that profiles optimizer step `step` and prints the top CUDA kernels."""
    import torch
    from transformers import TrainerCallback

    class _Profiler(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                print(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=40), flush=True)
                self.prof = None

    return _Profiler()


def probe_batch_loss(trainer: Any, collate: Any, probe: list[dict], cuda: bool) -> float:
    """Loss on the same 8 examples for every configuration, before any update (LoRA B = 0)."""
    import torch

    feats = [{"input_ids": p["input_ids"],
              "labels": [i if m else -100 for i, m in zip(p["input_ids"], p["completion_mask"])]} for p in probe]
    batch = {k: (v.to(trainer.model.device) if hasattr(v, "to") else v) for k, v in collate(feats).items()}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    trainer.model.train()  # the mode training runs in: compiled layers are not compiled twice
    with ctx:
        loss = trainer.compute_loss(trainer.model, batch)
    return round(float(loss.detach()), 5)


# ----------------------------------------------------------------------------- driver

def card_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for card in ("h200", "h100", "a100", "l4", "t4"):
        if card in name:
            return card
    return name.replace(" ", "-")


def matmul_tflops() -> float | None:
    """The card's bf16 matmul rate on random 8192^3 products (the MFU ceiling actually seen)."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return round(2 * 8192**3 * 20 / (time.perf_counter() - start) / 1e12, 1)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def table(results: list[dict]) -> str:
    ref = next((r["tokens_per_s"] for r in results if r["config"] == "reference" and "tokens_per_s" in r), None)
    lines = [f"{'config':16} {'tok/s':>9} {'x ref':>6} {'step s':>7} {'tok/step':>9} {'peak GiB':>8} "
             f"{'FLOPs':>5} {'MFU':>6} {'probe':>8}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:16} FAILED: {r['error'][-200:]}")
            continue
        x = f"{r['tokens_per_s'] / ref:.1f}" if ref else "-"
        lines.append(f"{r['config']:16} {r['tokens_per_s']:9.0f} {x:>6} {r['step_s']:7.3f} {r['tokens_per_step']:9.0f} "
                     f"{r['peak_alloc_gib'] if r['peak_alloc_gib'] is not None else '-':>8} {r['flops_per_token']:>5} "
                     f"{r['mfu']:6.1%} {r['probe_loss']:8.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scaling over GPUs

def launch_command(n: int, tiny: bool) -> list[str]:
    """`accelerate launch` for n processes (one per GPU; gloo processes on a CPU with --tiny)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]  # torchrun underneath; a free port
    return cmd


def visible_gpus(n: int) -> str:
    """CUDA_VISIBLE_DEVICES for the first n of the GPUs this process may use."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = current.split(",") if current else [str(i) for i in range(n)]
    return ",".join(ids[:n])


def run_scaling(a: argparse.Namespace, name: str, model_dir: Path, header: dict, card: str, warmup: int,
                steps: int, n_examples: int, deadline: float | None) -> list[dict]:
    """Launch `name` on each GPU count of --gpus in turn ('4p': 4 GPUs, per-GPU batch kept);
    write scaling-<card>-x<N>[-pergpu].json for each. A launch that would not end before
    `deadline` (judged by the slowest launch so far) is skipped."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log-scaling.txt"
    runs = [(int(x.rstrip("p")), x.endswith("p")) for x in a.gpus.split(",")]
    available = max(n for n, _ in runs) if a.tiny else torch_device_count()  # CPU processes: any count
    results: list[dict] = []
    for n, per_gpu in runs:
        left = deadline - time.time() if deadline else a.timeout
        need = max([45.0] + [r["process_s"] for r in results if "tokens_per_s" in r])
        base = {"config": name, "processes": n, "per_gpu_batch_kept": per_gpu, "step_tokens": a.step_tokens}
        if n > available:
            result = {**base, "error": f"only {available} GPUs visible"}
        elif left < need:
            result = {**base, "error": f"skipped: {left:.0f} s of the time budget left, a launch takes ~{need:.0f} s"}
        else:
            cmd = launch_command(n, a.tiny) + [
                __file__, "--worker", name, "--model-dir", str(model_dir), "--warmup", str(warmup),
                "--steps", str(steps), "--examples", str(n_examples), "--scaling"]
            cmd += ["--tiny"] if a.tiny else []
            cmd += ["--per-gpu-batch"] if per_gpu else []
            cmd += ["--step-tokens", str(a.step_tokens)]
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            if not a.tiny:
                env["CUDA_VISIBLE_DEVICES"] = visible_gpus(n)
            result, text = _launch(cmd, env, int(min(a.timeout, left)), base)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"\n===== {name} on {n} {'process' if a.tiny else 'GPU'}(s): {' '.join(cmd)}\n{text}")
        results.append(result)
        print(json.dumps(result), flush=True)
        step = "" if a.step_tokens == DEFAULT_STEP else f"-step{a.step_tokens // 1024}k"
        path = out / f"scaling-{card}-x{n}{'-pergpu' if per_gpu else ''}{step}.json"
        path.write_text(json.dumps({**header, "result": result}, indent=2))
    return results


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _launch(cmd: list[str], env: dict, timeout: int, base: dict) -> tuple[dict, str]:
    """Run a worker command; its RESULT line, or the error, and its output."""
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {**base, "error": text[-3000:]}
    except subprocess.TimeoutExpired as e:
        text = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        result = {**base, "error": f"timeout after {timeout} s"}
    result["process_s"] = round(time.time() - started, 1)
    return result, text


def scaling_table(results: list[dict], one: dict | None = None) -> str:
    """One row per run: throughput, speed-up and efficiency against `one` (default: the one-GPU
    run among `results`), per-GPU micro-batch, memory of each GPU, and the loss at the last step."""
    one = one or next((r for r in results if r.get("processes") == 1 and "tokens_per_s" in r), None)
    lines = [f"{'GPUs':>4} {'batch':>7} {'tok/s':>9} {'speed-up':>8} {'effic.':>6} {'step s':>7} {'tok/step':>9} "
             f"{'rows/GPU':>8} {'peak GiB per GPU':>22} {'loss@end':>9} {'Δ vs 1':>8} {'tokens':>9}"]
    for r in results:
        n = r.get("processes", "?")
        mode = "per-GPU" if r.get("per_gpu_batch_kept") else "global"
        if "error" in r:
            lines.append(f"{n:>4} {mode:>7} FAILED: {r['error'][-300:]}")
            continue
        speedup = r["tokens_per_s"] / one["tokens_per_s"] if one else None
        peaks = ",".join(f"{p:g}" for p in r["peak_alloc_gib_per_gpu"]) if r.get("peak_alloc_gib_per_gpu") else "-"
        loss = r.get("final_loss")
        delta = (f"{loss - one['final_loss']:+.4f}" if one and loss is not None and one.get("final_loss") is not None
                 else "-")
        lines.append(
            f"{n:>4} {mode:>7} {r['tokens_per_s']:9.0f} {f'{speedup:.2f}x' if speedup else '-':>8} "
            f"{f'{speedup / n:.0%}' if speedup else '-':>6} {r['step_s']:7.3f} {r['tokens_per_step']:9.0f} "
            f"{r['per_device_batch']:>8} {peaks:>22} {loss if loss is not None else '-':>9} {delta:>8} "
            f"{r['tokens_trained']:>9}")
    return "\n".join(lines)


def summarize(folder: Path) -> None:
    """Print every scaling-*.json in `folder` as one table per card and step size (train.step_tokens),
    each against the one-GPU run of the same step size."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("scaling-*.json"))]
    groups = sorted({(r["card"], r["result"].get("step_tokens", DEFAULT_STEP)) for r in runs})
    for card, step in groups:
        mine = [r for r in runs if r["card"] == card and r["result"].get("step_tokens", DEFAULT_STEP) == step]
        results = sorted((r["result"] for r in mine),
                         key=lambda x: (bool(x.get("per_gpu_batch_kept")), x.get("processes", 0)))
        one = next((x for x in results if x.get("processes") == 1 and "tokens_per_s" in x), None)
        head = mine[0]
        print(f"\n{card} ({head.get('device', 'cpu')}), {head['versions']}; {head['warmup']} warm-up + "
              f"{head['steps']} timed optimizer steps; global = train.step_tokens={step} tokens per optimizer "
              f"step shared by the GPUs (the same optimisation on any count), per-GPU = each GPU keeps the "
              f"one-GPU micro-batch; loss@end after the same samples for every 'global' row")
        print(scaling_table(results, one))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random Phi-3 on the CPU (a check, not a timing)")
    ap.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (compilation happens here)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    ap.add_argument("--examples", type=int, default=None, help="synthetic training examples")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for train-<card>.json")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--gpus", default=None,
                    help="scaling: comma list of GPU counts for one config, e.g. 1,2,4; '4p' = 4 GPUs each "
                         "keeping the one-GPU micro-batch (global batch x 4)")
    ap.add_argument("--budget", type=int, default=0,
                    help="scaling: seconds from the start for everything; launches that would overrun are skipped")
    ap.add_argument("--per-gpu-batch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step-tokens", type=int, default=DEFAULT_STEP,
                    help="train.step_tokens: tokens per optimizer step shared by all GPUs (65536: every one of "
                         "4 GPUs keeps a full 16k micro-batch)")
    ap.add_argument("--summarize", default=None, metavar="DIR", help="print the scaling-*.json of DIR as one table")
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scaling", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    started = time.time()
    if a.summarize:
        summarize(Path(a.summarize))
        return
    if a.gpus and not a.configs:
        a.configs = "fast-eager" if a.tiny else "fast"
    names = (a.configs or ("reference,fast-eager" if a.tiny else "reference,fast,small")).split(",")
    warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    steps = a.steps if a.steps is not None else (2 if a.tiny else 6)
    n_examples = a.examples or (64 if a.tiny else 1200)

    if a.worker:
        result = run_config(a.worker, Path(a.model_dir), a.tiny, warmup, steps, n_examples,
                            scaling=a.scaling, per_gpu_batch=a.per_gpu_batch, step_tokens=a.step_tokens)
        if result is not None:  # rank 0
            print("RESULT " + json.dumps(result), flush=True)
        return

    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    card = card_name() if not a.tiny else "cpu-tiny"
    header = {"card": card, "versions": versions(), "matmul_tflops": matmul_tflops() if not a.tiny else None,
              "n_params": N_PARAMS, "peak_flops_for_mfu": PEAK_FLOPS, "warmup": warmup, "steps": steps}
    if card != "cpu-tiny":
        import torch

        header["device"] = torch.cuda.get_device_name()
    print(json.dumps(header), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir = Path(a.model_dir) if a.model_dir else make_model_dir(Path(tmp), a.tiny)
        if a.gpus:
            if len(names) != 1:
                ap.error("--gpus times one configuration; give one name in --configs")
            deadline = started + a.budget if a.budget else None
            results = run_scaling(a, names[0], model_dir, header, card, warmup, steps, n_examples, deadline)
            print(f"\n{card} ({header.get('device', 'cpu')}): {names[0]} on {a.gpus} "
                  f"{'processes' if a.tiny else 'GPUs'}, {warmup} warm-up + {steps} timed steps")
            print(scaling_table(results))
            return
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir),
                   "--warmup", str(warmup), "--steps", str(steps), "--examples", str(n_examples)]
            if a.tiny:
                cmd.append("--tiny")
            started = time.time()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
                out = proc.stdout + proc.stderr
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                result = json.loads(line[7:]) if line else {"config": name, "error": out[-3000:]}
            except subprocess.TimeoutExpired as e:
                out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
                result = {"config": name, "error": f"timeout after {a.timeout} s"}
            result["process_s"] = round(time.time() - started, 1)
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / f"log-{name}.txt").write_text(out)
            results.append(result)
            print(json.dumps(result), flush=True)
            (Path(a.out) / f"train-{card}.json").write_text(json.dumps({**header, "results": results}, indent=2))
    print(f"\n{card} ({header.get('device', 'cpu')}); MFU at {PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
          f"N = {N_PARAMS:.3g}; matmul measured {header['matmul_tflops']} TFLOP/s")
    print(table(results))


if __name__ == "__main__":
    main()
