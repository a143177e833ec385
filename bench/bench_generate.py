"""Batched generation (prodtune.generate) vs one prompt at a time (the original notebook's way).

    python bench/bench_generate.py                 # GPU: random-weight Phi-3-mini shape, bf16, 1000 prompts
    python bench/bench_generate.py --tiny          # CPU check: tiny random Phi-3, float32, 32 prompts

The model has Phi-3-mini-4k-instruct's shape (hidden 3072, 32 layers, 32 heads, intermediate
8192, vocab 32064) with random weights built directly on the GPU, so no download is needed.
Prompts are random token ids with the length spread of real prompts (system prompt + question,
48-128 tokens). Both ways generate greedily and ignore end-of-sequence (no eos token), so every
answer is exactly --max-new-tokens long and both do the same work.

The one-at-a-time baseline (model.generate per prompt, batch 1) takes seconds per prompt on a
GPU, so by default it is timed on --baseline-n prompts and extrapolated to --n; the output says
so. Its answers are compared token by token with the batched answers to the same prompts.
Greedy decoding in bf16 can pick a different token where two logits tie to bf16 precision
(padding changes the shapes of the matrix products and so their rounding), and a random-weight
model has many near-ties; the share of identical answers is reported, not assumed. In float32
(--tiny) they must all be identical.

Writes bench/results/generate-<card>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prodtune.generate import generate_ids  # noqa: E402

PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int):
    """A random-weight Phi3ForCausalLM created directly on `device` in `dtype` (no CPU copy)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                        tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # no stopping: every answer has max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n random prompts of lo..hi tokens (ids clear of the low special ids)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab - 10, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_at_a_time(model, prompts: list[list[int]], max_new_tokens: int, device: str) -> list[list[int]]:
    """The original notebook's loop: model.generate on each prompt alone (batch 1, no padding)."""
    from tqdm.auto import tqdm

    out = []
    with torch.inference_mode():
        for ids in tqdm(prompts, desc="one at a time", unit="prompt"):
            x = torch.tensor([ids], device=device)
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(seq[0, len(ids):].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of identical answers, and how far answers agree before their first different token."""
    same = [x == y for x, y in zip(a, b)]
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return {"compared": len(same), "identical": int(sum(same)), "share_identical": round(float(np.mean(same)), 4),
            "mean_share_before_first_difference": round(float(np.mean(prefix)), 4)}


def card_name(device: str, tiny: bool) -> str:
    if device != "cuda":
        return "cpu-tiny" if tiny else "cpu"
    name = torch.cuda.get_device_name(0)
    m = re.search(r"\b([A-Z]+\d+[A-Z]?)\b", name.upper().replace("NVIDIA", ""))
    return (m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")) + ("-tiny" if tiny else "")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU in float32 (a quick check)")
    p.add_argument("--n", type=int, default=None, help="prompts (default 1000; 32 with --tiny)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default 256; 32 with --tiny)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch sizes to time (default 128 256; 16 with --tiny)")
    p.add_argument("--baseline-n", type=int, default=None,
                   help="prompts timed one at a time, extrapolated to --n (default 32; all with --tiny; 0 = all)")
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(48, 128), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/generate-<card>.json)")
    args = p.parse_args(argv)

    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU visible; run on the accelerator machine, or use --tiny to check on the CPU")
    dtype = torch.float32 if tiny else torch.bfloat16
    n = args.n or (32 if tiny else 1000)
    max_new = args.max_new_tokens or (32 if tiny else 256)
    batch_sizes = args.batch_size or ([16] if tiny else [128, 256])
    baseline_n = n if (args.baseline_n == 0 or (args.baseline_n is None and tiny)) else min(args.baseline_n or 32, n)
    shape = TINY if tiny else PHI3_MINI

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, args.seed)
    sync(device)
    build_s = time.perf_counter() - t0
    lo, hi = args.prompt_tokens
    prompts = make_prompts(n, shape["vocab_size"], lo, hi, args.seed)
    # The baseline's prompts: a seeded random subset, so its mean time per prompt is representative.
    subset = sorted(np.random.default_rng(args.seed + 1).choice(n, size=baseline_n, replace=False).tolist())

    # Warm-up (CUDA context, kernels, allocator) so neither side pays it.
    generate_ids(model, prompts[:2], pad_id=0, stop_ids=[], batch_size=2, max_new_tokens=4, desc="warm-up")
    one_at_a_time(model, prompts[:1], 4, device)

    batched = {}
    batched_ids = {}
    for bs in batch_sizes:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        ids = generate_ids(model, prompts, pad_id=0, stop_ids=[], batch_size=bs, max_new_tokens=max_new,
                           min_new_tokens=max_new, desc=f"batched ({bs})")
        sync(device)
        secs = time.perf_counter() - t
        new_tokens = sum(len(x) for x in ids)
        batched_ids[bs] = ids
        batched[bs] = {"batch_size": bs, "seconds": round(secs, 2), "prompts_per_s": round(n / secs, 2),
                       "new_tokens_per_s": round(new_tokens / secs, 1), "new_tokens": new_tokens,
                       "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                       if device == "cuda" else None}

    sync(device)
    t = time.perf_counter()
    single_ids = one_at_a_time(model, [prompts[i] for i in subset], max_new, device)
    sync(device)
    single_secs = time.perf_counter() - t
    per_prompt = single_secs / baseline_n
    baseline = {"timed_prompts": baseline_n, "timed_seconds": round(single_secs, 2),
                "seconds_per_prompt": round(per_prompt, 3), "new_tokens_per_s": round(max_new / per_prompt, 1),
                "seconds_for_all": round(per_prompt * n, 1), "extrapolated": baseline_n < n}
    for bs, res in batched.items():
        res["speedup"] = round(per_prompt * n / res["seconds"], 1)
        res["agreement_with_one_at_a_time"] = agreement([batched_ids[bs][i] for i in subset], single_ids)

    import transformers

    best = max(batched.values(), key=lambda r: r["speedup"])
    result = {
        "bench": "generate", "card": card_name(device, tiny),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "model": "random-weight Phi3ForCausalLM, " + ("tiny" if tiny else "Phi-3-mini-4k-instruct shape"),
        "shape": shape, "dtype": str(dtype).removeprefix("torch."), "prompts": n, "max_new_tokens": max_new,
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": round(float(np.mean([len(x) for x in prompts])), 1)},
        "decoding": "greedy, no end-of-sequence (every answer max_new_tokens long)",
        "model_build_s": round(build_s, 1), "batched": list(batched.values()), "one_at_a_time": baseline,
        "best_speedup": best["speedup"], "best_batch_size": best["batch_size"],
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    out = args.out or ROOT / "bench" / "results" / f"generate-{result['card']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")
    return result


def print_table(r: dict) -> None:
    b = r["one_at_a_time"]
    label = f"extrapolated from {b['timed_prompts']} timed prompts" if b["extrapolated"] else "all prompts timed"
    print(f"\n{r['model']} ({r['dtype']}) on {r['device']}: {r['prompts']} prompts "
          f"({r['prompt_tokens']['min']}-{r['prompt_tokens']['max']} tokens), {r['max_new_tokens']} new tokens each")
    print(f"{'method':<24}{'seconds':>10}{'prompts/s':>11}{'new tok/s':>11}{'speedup':>9}{'identical':>11}")
    print(f"{'one at a time':<24}{b['seconds_for_all']:>10.1f}{r['prompts'] / b['seconds_for_all']:>11.2f}"
          f"{b['new_tokens_per_s']:>11.1f}{1.0:>9.1f}x{'':>10}   ({label})")
    for x in r["batched"]:
        a = x["agreement_with_one_at_a_time"]
        print(f"{'batched, batch ' + str(x['batch_size']):<24}{x['seconds']:>10.1f}{x['prompts_per_s']:>11.2f}"
              f"{x['new_tokens_per_s']:>11.1f}{x['speedup']:>9.1f}x"
              f"{a['identical']:>5}/{a['compared']:<5}")


if __name__ == "__main__":
    main()
