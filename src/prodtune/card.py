"""The model card (README.md) shipped with an export or a Hub upload: Hugging Face front matter, what the
model does, its prompt format, the recipe, the held-out comparison with its intervals, the training
curve, limitations and how to run it (transformers + peft, llama.cpp, Ollama, vLLM).

Everything in it is read from the run folder (config.yaml, train_report.json, format_report.json,
compare*/metrics.json): the card states numbers the run measured, and says which model they are from.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from prodtune import models
from prodtune.config import Config
from prodtune.generate import describe_decoding
from prodtune.io import RunPaths, atomic_write_text, read_json
from prodtune.metrics import fmt, fmt_interval, verdict
from prodtune.prompts import build_prompt, question_for

WHAT = ("export", "adapter", "merged", "gguf")
"""What a card describes: the export folder, or one of the Hub uploads (`prodtune push --what`)."""

HEADLINE = [("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("bleu", "BLEU"), ("embedding_cosine", "embedding cosine"),
            ("loss", "reference loss"), ("perplexity", "perplexity"), ("length_words", "answer words"),
            ("stop_rate", "ended on end-of-turn")]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------- the base model

def _gguf_fields(cfg: Config) -> dict[str, Any]:
    """general.* metadata of a GGUF base model ({} for other bases)."""
    folder, name = models.resolve_model_path(cfg.model)
    if name is None:
        return {}
    path = Path(folder) / name
    return _gguf_general(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_general(path: str, mtime_ns: int) -> dict[str, Any]:
    """Read once per file version: a GGUFReader parses the whole header, tokenizer included (~2 s
    for the demo model), and one card asks for the base's id and license several times."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("general."):
            try:
                out[key] = field.contents()
            except Exception:  # an odd field is no reason to lose the card
                continue
    return out


def base_model_id(cfg: Config) -> str:
    """The Hub id of the base model: export.base_model, model.name_or_path when it is one, or for a GGUF
    base its organization and file name (SmolLM2-135M-Instruct.Q4_1.gguf -> HuggingFaceTB/SmolLM2-135M-Instruct)."""
    if cfg.export.base_model:
        return cfg.export.base_model
    name = cfg.model.name_or_path
    if HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    general = _gguf_fields(cfg)
    stem = Path(name).name
    if general:
        stem = re.sub(r"\.(gguf)$", "", stem, flags=re.I)
        stem = re.sub(r"[.-](f16|f32|bf16|q\d\w*|iq\d\w*)$", "", stem, flags=re.I)
        org = general.get("general.organization")
        return f"{org}/{stem}" if org else stem
    return stem


def base_license(cfg: Config) -> str | None:
    """The base model's license from its card (a local folder's or a cached hub README.md) or GGUF metadata."""
    general = _gguf_fields(cfg)
    if general.get("general.license"):
        return str(general["general.license"])
    readme = Path(cfg.model.name_or_path).expanduser() / "README.md"
    if not readme.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.model.name_or_path, "README.md") if HUB_ID.match(cfg.model.name_or_path) else None
        readme = Path(cached) if isinstance(cached, str) else readme
    if readme.is_file():
        from huggingface_hub import metadata_load

        value = (metadata_load(readme) or {}).get("license")
        return str(value) if value else None
    return None


# ----------------------------------------------------------------------------- pieces

def _verdict(name: str, diff: dict[str, Any]) -> str:
    """The comparison's verdict in words; answer length gets a direction, not a judgement."""
    return {"better": "better", "worse": "worse", "same": "no clear difference", "higher": "longer",
            "lower": "shorter"}[verdict(name, diff)]


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows: metric, base, tuned and tuned - base, each with its 95% interval."""
    rows = ["| metric | base | tuned | tuned − base | verdict |", "| --- | --- | --- | --- | --- |"]
    for name, label in HEADLINE:
        if name in metrics["base"]:
            rows.append(f"| {label} | {fmt_interval(metrics['base'][name])} | {fmt_interval(metrics['tuned'][name])} | "
                        f"{fmt_interval(metrics['diff'][name], signed=True)} | {_verdict(name, metrics['diff'][name])} |")
    return rows


def _shipped_rows(paths: RunPaths, reference: dict[str, Any]) -> list[str]:
    """One row per exported form that `prodtune compare --model` scored, beside the adapter's numbers."""
    rows = []
    for folder in sorted(paths.root.glob("compare-*")):
        model = folder.name.removeprefix("compare-")
        if model.endswith("validation") or not (folder / "metrics.json").is_file():
            continue
        m = read_json(folder / "metrics.json")
        rows.append(f"| {model} (`{folder.name}/`) | " + " | ".join(
            fmt_interval(m["tuned"][k]) if k in m["tuned"] else "–" for k in ("rouge_l", "chrf", "loss")) + " |")
    if not rows:
        return []
    head = ["| tuned model | ROUGE-L | chrF | reference loss |", "| --- | --- | --- | --- |",
            "| adapter on the base (`compare/`) | " + " | ".join(
                fmt_interval(reference["tuned"][k]) if k in reference["tuned"] else "–" for k in ("rouge_l", "chrf", "loss")) + " |"]
    return head + rows


def _sentence(metrics: dict[str, Any], name: str, label: str) -> str:
    b, t, d = metrics["base"][name], metrics["tuned"][name], metrics["diff"][name]
    return (f"{label} {fmt(b['mean'])} → {fmt(t['mean'])} (difference and 95% CI "
            f"{fmt_interval(d, signed=True)}: {_verdict(name, d)})")


def _files_table(files: dict[str, int]) -> list[str]:
    def what(name: str) -> str:
        if name.startswith("merged/"):
            return "merged model (transformers, vLLM)"
        if name.endswith(".gguf"):
            return f"GGUF {name.rsplit('-', 1)[-1].removesuffix('.gguf')} (llama.cpp, Ollama, LM Studio)"
        return {"Modelfile": "Ollama Modelfile", "README.md": "this card", "loss.png": "training curve",
                "adapter_model.safetensors": "LoRA adapter weights (peft)", "adapter_config.json": "LoRA settings (peft)",
                }.get(name, "")

    rows = ["| file | size | what |", "| --- | --- | --- |"]
    for name, size in files.items():
        size_text = f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.1f} KiB"
        rows.append(f"| `{name}` | {size_text} | {what(name)} |")
    return rows


def _prompt_example(cfg: Config, paths: RunPaths) -> str:
    tokenizer = models.load_tokenizer(cfg.model, path=str(paths.adapter))
    question = question_for("Mog's Kittens", cfg.data.question_templates[0])
    return tokenizer.apply_chat_template(build_prompt(question, cfg.data.system_prompt),
                                         add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------- the card

def card_text(cfg: Config, paths: RunPaths, files: dict[str, int], what: str = "export",
              repo: str | None = None, example: str | None = None) -> str:
    """The model card for `what` (the export folder, or a Hub upload of adapter, merged or gguf files).
    `example` is the rendered prompt it shows (made from the adapter's tokenizer when not given)."""
    base = base_model_id(cfg)
    train = read_json(paths.train_report) if paths.train_report.is_file() else {}
    fmt_report = read_json(paths.format_report) if paths.format_report.is_file() else {}
    metrics = read_json(paths.metrics_json) if paths.metrics_json.is_file() else None
    ggufs = [n for n in files if n.endswith(".gguf")]
    front: dict[str, Any] = {"base_model": base, "library_name": "peft" if what == "adapter" else "transformers",
                             "pipeline_tag": "text-generation"}
    license_ = base_license(cfg)
    if license_:
        front["license"] = license_
    front["tags"] = ["prodtune", "lora", "sft", "trl", "product-descriptions", "e-commerce"] + \
        (["gguf", "llama.cpp", "ollama"] if ggufs else [])
    if cfg.data.raw_path.startswith("hf:"):
        front["datasets"] = [cfg.data.raw_path.removeprefix("hf:")]
    ref = repo or "<user>/<repo>"
    n = metrics["n"] if metrics else None
    splits = fmt_report.get("splits", {})
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {base.split('/')[-1]} tuned to describe products ({cfg.run_name})", "",
             f"A fine-tune of {f'[{base}](https://huggingface.co/{base})' if HUB_ID.match(base) else f'`{base}`'} "
             "that answers questions about e-commerce products "
             "from their title: asked about a product, it writes a product description in the style of the "
             f"training data (`{cfg.data.raw_path}`). LoRA adapters (r={cfg.lora.r}, alpha={cfg.lora.alpha}"
             f"{', on a 4-bit NF4 base: QLoRA' if cfg.model.load_in_4bit else ''}) trained with TRL's SFTTrainer "
             "by prodtune."]
    if cfg.model.name_or_path.endswith(".gguf") or cfg.model.gguf_file:
        lines += ["", f"The base weights were read from `{Path(cfg.model.name_or_path).name}` (a quantized GGUF) and "
                      f"dequantized: they differ from the original {base} by that quantization."]
    lines += ["", "## Files", "", *_files_table(files)]
    if what == "export":
        lines += ["", "(and `export_report.json`, prodtune's record of this export: formats, sizes, timings)"]
    lines += ["", "## Prompt format", "",
              "The base model's chat template, with this system prompt and a question about one product "
              f"(one of {len(cfg.data.question_templates)} phrasings, e.g. `{cfg.data.question_templates[0]}`):", "",
              "```text", (example if example is not None else _prompt_example(cfg, paths)).rstrip("\n"), "```"]
    lines += ["", "## Results on held-out products", ""]
    if metrics:
        lines += [f"Scored by `prodtune compare` on **n = {n} test products whose titles never appeared in training** "
                  "(the splits are made by normalised title, so no product is in two of them). The numbers are "
                  f"those of the **LoRA adapter on the base model{' (4-bit)' if cfg.model.load_in_4bit else ''}** "
                  "(`compare/metrics.json`) against the base alone, greedy-decoded with the settings in the "
                  "recipe below. Brackets: 95% bootstrap intervals; the difference is paired (same items).", "",
                  *metrics_table(metrics)]
        shipped = _shipped_rows(paths, metrics)
        if shipped:
            lines += ["", "The exported forms, scored the same way on the same items (`prodtune compare --model ...`):",
                      "", *shipped]
        else:
            lines += ["", "The exported forms were not scored separately; `prodtune compare --model merged` and "
                          "`--model gguf` do it."]
    else:
        lines += ["Not measured yet: run `prodtune compare` and export again."]
    if paths.loss_png.is_file():
        lines += ["", "## Training", "", "![Training and validation loss](loss.png)"]
    else:
        lines += ["", "## Training"]
    t, e = cfg.train, cfg.eval
    recipe = [("base model", f"`{cfg.model.name_or_path}`" + (" in 4-bit NF4" if cfg.model.load_in_4bit else "")),
              ("LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, "
                       f"on {', '.join(train.get('lora_targets') or [str(cfg.lora.target_modules)])}"),
              ("training", f"{t.epochs:g} epoch(s) (max_steps {t.max_steps}), learning rate {t.learning_rate:g} "
                           f"{t.lr_scheduler} with {t.warmup_steps} warm-up steps, {_step(t, train)}, "
                           f"{t.optim}, weight decay {t.weight_decay}, max length {t.max_length}, seed {t.seed}"),
              ("loss", "on the answer and its end-of-turn token only (prompt tokens masked)"),
              ("data", (f"{splits['train']['rows']} training, {splits['validation']['rows']} validation and "
                        f"{splits['test']['rows']} test examples" if splits else "examples") + f" from `{cfg.data.raw_path}`"),
              ("decoding evaluated", describe_decoding(e))]
    if train:
        recipe.append(("run", f"{train.get('steps')} steps on {train.get('device')} ({train.get('precision')}) in "
                              f"{train.get('train_runtime_s', 0):.0f} s; validation loss {fmt(train.get('eval_loss_start'))} → "
                              f"{fmt(train.get('final_eval_loss'))}"))
    lines += ["", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in recipe]]
    lines += ["", "## Limitations", "", *_limitations(cfg, metrics, fmt_report)]
    lines += ["", "## How to run it", "", *_usage(cfg, paths, what, ref, files, ggufs, base)]
    return "\n".join(lines) + "\n"


def _step(t: Any, train: dict[str, Any]) -> str:
    """The optimizer step as trained (train_report.json), else as configured."""
    step = train.get("step") or {}
    if step.get("tokens"):
        return (f"{step['tokens']:,} tokens (~{step.get('examples', 0):g} examples) per optimizer step, "
                f"{step.get('optimizer_steps_per_epoch', '?')} steps per epoch")
    return f"{t.step_tokens:,} tokens per optimizer step"


def _limitations(cfg: Config, metrics: dict[str, Any] | None, fmt_report: dict[str, Any]) -> list[str]:
    out = []
    if metrics:
        said = [_sentence(metrics, k, label) for k, label in (("loss", "reference loss"), ("rouge_l", "ROUGE-L"),
                                                              ("chrf", "chrF")) if k in metrics["base"]]
        out.append(f"- Measured on {metrics['n']} held-out products only: {'; '.join(said)}. An interval that "
                   "spans zero means base and tuned are not told apart on that measure.")
    out += ["- It has seen product titles and descriptions, not facts about the products: for a product it does "
            "not know it writes a fluent description with invented details (authors, sizes, materials, quotes). "
            "Check the facts before publishing a description it wrote.",
            "- It learned the style and the biases of its training descriptions (English marketing copy scraped from "
            "product pages); it is not a general assistant and was not evaluated on anything else."]
    if cfg.model.load_in_4bit:
        out.append("- The adapter was trained against the 4-bit base; the merged and GGUF files fold it into the "
                   "16-bit base, so they answer slightly differently (see the exported forms' scores above).")
    if cfg.eval.min_new_tokens or cfg.eval.no_repeat_ngram_size:
        out.append("- The scores above used decoding constraints (a minimum answer length and/or no repeated n-grams) "
                   "that llama.cpp and Ollama do not have; plain greedy decoding there can stop earlier or repeat itself.")
    return out


def _usage(cfg: Config, paths: RunPaths, what: str, ref: str, files: dict[str, int], ggufs: list[str],
           base: str) -> list[str]:
    system = cfg.data.system_prompt.replace('"', '\\"')
    question = "Describe the product 'Klutz Book of Knots'."
    adapter_ref = ref if what == "adapter" else str(paths.adapter)
    merged_ref = ref if what == "merged" else ("./merged" if any(n.startswith("merged/") for n in files) else None)
    lines = ["### transformers + peft", "", "```python", "from peft import AutoPeftModelForCausalLM",
             "from transformers import AutoTokenizer", "",
             f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter_ref}")  # the LoRA adapter on its base',
             f'tokenizer = AutoTokenizer.from_pretrained("{adapter_ref}")']
    if merged_ref:
        lines += [f'# or the merged model: AutoModelForCausalLM.from_pretrained("{merged_ref}")']
    lines += [f'messages = [{{"role": "system", "content": "{system}"}},' if system else "messages = [",
              f'            {{"role": "user", "content": "{question}"}}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              f"out = model.generate(**inputs, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    gguf_name = ggufs[0] if ggufs else paths.gguf(cfg.run_name, "q8_0").name
    tag = gguf_name.rsplit("-", 1)[-1].removesuffix(".gguf")
    sys_flag = f' -sys "{system}"' if system else ""
    lines += ["### llama.cpp", ""]
    if not ggufs:
        lines += ["The GGUF files are made by `prodtune export` (export.formats=gguf-q8_0) and uploaded with "
                  "`prodtune push --what gguf`.", ""]
    lines += ["```bash", f"llama-cli -m {gguf_name} -cnv{sys_flag} --temp 0 -n {cfg.eval.max_new_tokens}"]
    if what == "gguf" and ggufs:
        lines.append(f"llama-cli -hf {ref}:{tag} -cnv{sys_flag} --temp 0   # straight from the Hub")
    lines += ["```", "", "### Ollama", "", "```bash"]
    if "Modelfile" in files:
        lines += ["ollama create product-describer -f Modelfile   # in the folder holding the GGUF and the Modelfile",
                  f'ollama run product-describer "{question}"']
    else:
        lines += ["# prodtune export writes a Modelfile (export.formats=...,modelfile) with the template, system prompt and stops"]
    if what == "gguf" and ggufs:
        lines.append(f"ollama run hf.co/{ref}:{tag}   # from the Hub: the GGUF's own chat template, no system prompt")
    lines += ["```", "", "### vLLM", "", "```bash"]
    if merged_ref:
        lines.append(f"vllm serve {merged_ref}")
    lines += [f"vllm serve {base} --enable-lora --lora-modules product-describer={adapter_ref}", "```",
              "", "Then ask through the OpenAI-compatible chat endpoint with the system prompt above."]
    return lines


def write_card(cfg: Config, paths: RunPaths, out: Path, files: dict[str, int]) -> Path:
    """export/README.md: the card of the export folder, listing `files` and itself."""
    files = dict(files)
    files[out.name] = 0
    example = _prompt_example(cfg, paths)
    text = card_text(cfg, paths, files, example=example)
    # The card lists its own size: render once to know it (the table's digits barely move it).
    files[out.name] = len(text.encode("utf-8"))
    atomic_write_text(out, card_text(cfg, paths, files, example=example))
    return out
