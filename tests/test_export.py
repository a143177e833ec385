"""prodtune export: merged weights, GGUF round trips for Phi-3 (fused qkv/gate_up) and Llama, the Ollama
Modelfile's template against the Jinja chat template, the model card, push (dry run, no token), the
exported models scored by compare, and bad input. Tiny random models with tokenizers llama.cpp knows."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
import yaml

from prodtune.cli import main
from prodtune.config import load_config
from prodtune.errors import UserError
from prodtune.io import RunPaths

FORMATS = ["merged", "gguf-f16", "gguf-q8_0", "modelfile", "card"]
END_OF_TURN = {"phi3": "<|end|>", "llama": "<|im_end|>"}
Q8_MAX, Q8_MEAN = 0.10, 0.03
"""Q8_0 keeps each block of 32 weights as int8 times one scale. On these random tiny models (weights of std 0.02,
the worst case for a block scale) its logits stay within 10% of the merged model's largest logit at any position
and token, and within 3% on average (measured: at most 6.9% and 2.2%); the greedy answers are the same."""
PROMPTS = ["Mog's Kittens", "Garden Hose 50 ft", "Klutz Book of Knots"]


@pytest.fixture(scope="module", params=["phi3", "llama"])
def shipped(request, tmp_path_factory):
    """A run with a LoRA adapter (random, non-zero B) on a tiny model, compared, then exported in every format."""
    from tiny import save_tiny_shippable
    from tiny_run import make_run

    from prodtune.plots import plot_loss
    from prodtune.stages import run_stage

    root = tmp_path_factory.mktemp(f"ship-{request.param}")
    model_dir = save_tiny_shippable(root / "model", request.param)
    cfg = make_run(root / "run", model_dir, n_items=4)
    cfg.export.formats = list(FORMATS)
    cfg.export.base_model = f"tests/tiny-{request.param}"
    paths = RunPaths(cfg.run_dir)
    plot_loss([json.loads(line) for line in paths.train_log.read_text().splitlines()], paths.loss_png)
    run_stage(cfg, "compare")
    report = run_stage(cfg, "export")  # as the CLI runs it: the run's config.yaml is this one
    return request.param, cfg, report


def _ids(tokenizer, question: str, system: str = "You describe products.") -> torch.Tensor:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Describe '{question}'."}]
    return torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]])


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _greedy(model, ids: torch.Tensor, n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------- what export writes

def test_export_writes_every_format_and_nothing_else(shipped):
    arch, cfg, report = shipped
    paths = RunPaths(cfg.run_dir)
    names = {p.name for p in paths.export.iterdir() if p.name != ".stage.json"}  # the stage's record
    assert names == {"merged", "tiny-F16.gguf", "tiny-Q8_0.gguf", "Modelfile", "README.md", "loss.png",
                     "export_report.json"}
    on_disk = {str(p.relative_to(paths.export)) for p in paths.export.rglob("*") if p.is_file()}
    assert set(report["files"]) == on_disk - {"export_report.json", ".stage.json"}  # every file but the reports
    assert not list(paths.root.glob(".export*")), "no temporary folder left behind"
    assert "tiny-Q8_0.gguf" in report["summary"] and "ollama create" in report["summary"]
    gen = json.loads((paths.merged / "generation_config.json").read_text())
    from prodtune.models import load_tokenizer

    tok = load_tokenizer(cfg.model, str(paths.adapter))
    assert tok.convert_tokens_to_ids(END_OF_TURN[arch]) in gen["eos_token_id"]
    assert gen["max_new_tokens"] == cfg.eval.max_new_tokens and gen["do_sample"] is False
    if arch == "phi3":  # the SentencePiece vocabulary llama.cpp's converter needs came along
        assert (paths.merged / "tokenizer.model").is_file()


def test_gguf_metadata_holds_tokenizer_template_and_fused_layers(shipped):
    import gguf

    arch, cfg, _ = shipped
    paths = RunPaths(cfg.run_dir)
    from prodtune.models import load_tokenizer

    tok = load_tokenizer(cfg.model, str(paths.adapter))
    reader = gguf.GGUFReader(str(paths.gguf("tiny", "q8_0")))
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.model"] == ("llama" if arch == "phi3" else "gpt2")
    assert len(fields["tokenizer.ggml.tokens"]) == len(tok)
    assert fields["tokenizer.ggml.tokens"][tok.convert_tokens_to_ids(END_OF_TURN[arch])] == END_OF_TURN[arch]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    tensors = {t.name: t for t in reader.tensors}
    if arch == "phi3":  # Phi-3 keeps q/k/v and gate/up fused in GGUF too
        assert "blk.0.attn_qkv.weight" in tensors and "blk.0.attn_q.weight" not in tensors
        assert tensors["blk.0.ffn_up.weight"].shape[1] == 2 * 128
    else:
        assert "blk.0.attn_q.weight" in tensors and "blk.0.ffn_gate.weight" in tensors
    assert tensors["blk.0.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_round_trip_logits_and_greedy_answers(shipped):
    from transformers import AutoModelForCausalLM

    from prodtune import models

    arch, cfg, _ = shipped
    paths = RunPaths(cfg.run_dir)
    tok = models.load_tokenizer(cfg.model, str(paths.adapter))
    adapter = models.load_model(cfg.model, "cpu", adapter=paths.adapter)
    merged = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=torch.float32).eval()
    rounded = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=torch.float32).eval()
    for p in rounded.parameters():
        p.data = p.data.half().float()
    f16, q8 = _load_gguf(paths.gguf("tiny", "f16")), _load_gguf(paths.gguf("tiny", "q8_0"))
    for question in PROMPTS:
        ids = _ids(tok, question)
        with torch.no_grad():
            want = merged(ids).logits
            scale = want.abs().max()
            assert torch.allclose(adapter(ids).logits, want, atol=1e-4)
            # F16 GGUF == the merged weights rounded to float16, exactly as stored.
            assert torch.allclose(f16(ids).logits, rounded(ids).logits, atol=1e-5)
            assert (f16(ids).logits - want).abs().max() <= 1e-2 * scale
            err = (q8(ids).logits - want).abs()
            assert err.max() <= Q8_MAX * scale and err.mean() <= Q8_MEAN * want.abs().mean()
        greedy = _greedy(merged, ids)
        assert _greedy(adapter, ids) == greedy
        assert _greedy(f16, ids) == greedy
        assert _greedy(q8, ids) == greedy


# ----------------------------------------------------------------------------- Modelfile

def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and PARAMETER lines of a Modelfile (triple-quoted values may span lines)."""
    out: dict = {"PARAMETER": []}
    for key, value in re.findall(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) (""".*?"""|[^\n]*)', text, re.S | re.M):
        value = value[3:-3] if value.startswith('"""') else value
        if key == "PARAMETER":
            out["PARAMETER"].append(value.split(" ", 1))
        else:
            out[key] = value
    return out


def ollama_render(modelfile: dict, messages: list[dict]) -> str:
    """What Ollama sends the model: SYSTEM first when the request has no system message, then the template."""
    from gotemplate import render

    if modelfile.get("SYSTEM") and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile["SYSTEM"]}] + messages
    return render(modelfile["TEMPLATE"], {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


CONVERSATIONS = [
    [{"role": "user", "content": "Describe the product 'Mog's Kittens'."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a garden hose?"}],
    [{"role": "user", "content": "What is 'Klutz Book of Knots' about?"},
     {"role": "assistant", "content": "A book about knots.\n\nWith a rope."},
     {"role": "user", "content": "Who is it for? {{ .Content }} \"quoted\""}],
]


def test_modelfile_template_renders_exactly_the_chat_template(shipped):
    from prodtune.models import load_tokenizer

    arch, cfg, _ = shipped
    paths = RunPaths(cfg.run_dir)
    tok = load_tokenizer(cfg.model, str(paths.adapter))
    modelfile = parse_modelfile(paths.modelfile.read_text(encoding="utf-8"))
    assert modelfile["FROM"] == "./tiny-F16.gguf"  # the first GGUF in export.formats
    assert modelfile["SYSTEM"] == cfg.data.system_prompt
    for messages in CONVERSATIONS:
        system = [m for m in messages if m["role"] == "system"] or [{"role": "system", "content": modelfile["SYSTEM"]}]
        expected = tok.apply_chat_template(system + [m for m in messages if m["role"] != "system"],
                                           add_generation_prompt=True, tokenize=False)
        assert ollama_render(modelfile, messages) == expected
    stops = [json.loads(v) for k, v in modelfile["PARAMETER"] if k == "stop"]
    assert END_OF_TURN[arch] in stops
    params = dict(p for p in modelfile["PARAMETER"] if p[0] != "stop")
    assert params == {"temperature": "0", "num_predict": str(cfg.eval.max_new_tokens)}


def test_modelfile_keeps_a_template_default_system_prompt():
    """SmolLM2's template adds its own system prompt when there is none: a run without one trained with it."""
    from tiny import smollm2_tokenizer

    from prodtune.config import EvalConfig
    from prodtune.modelfile import modelfile_text

    tok = smollm2_tokenizer()
    parsed = parse_modelfile(modelfile_text(tok, "x.gguf", "", EvalConfig(min_new_tokens=8), ["<|im_end|>"], "t"))
    assert parsed["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        assert ollama_render(parsed, messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=False)
    parsed_text = modelfile_text(tok, "x.gguf", "", EvalConfig(min_new_tokens=8), ["<|im_end|>"], "t")
    assert "eval.min_new_tokens=8" in parsed_text  # said, since Ollama cannot do it


@pytest.mark.parametrize("template, complaint", [
    # Gemma-style: no system role at all.
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
     "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
     "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "system message"),
    # Text that depends on the content, not only on the roles.
    ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] | length > 30 %}[long]{% endif %}"
     "{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}", "content-dependent"),
])
def test_modelfile_refuses_templates_it_cannot_reproduce(template, complaint):
    from tiny import build_tokenizer

    from prodtune.config import EvalConfig
    from prodtune.modelfile import modelfile_text

    tok = build_tokenizer()
    tok.chat_template = template
    with pytest.raises(UserError, match=complaint):
        modelfile_text(tok, "x.gguf", "sys", EvalConfig(), ["<|end|>"], "t")


# ----------------------------------------------------------------------------- model card

def test_model_card_names_the_base_has_intervals_and_lists_the_exported_files(shipped):
    arch, cfg, _ = shipped
    paths = RunPaths(cfg.run_dir)
    text = paths.model_card.read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == f"tests/tiny-{arch}"
    assert front["pipeline_tag"] == "text-generation" and "gguf" in front["tags"]
    metrics = json.loads(paths.metrics_json.read_text())
    assert f"n = {metrics['n']} test products whose titles never appeared in training" in text
    rouge = metrics["tuned"]["rouge_l"]
    row = next(line for line in text.splitlines() if line.startswith("| ROUGE-L |"))
    assert re.search(r"\[-?[\d.]+, -?[\d.]+\]", row) and f"{rouge['mean']:.3f}" in row
    assert "LoRA adapter on the base model" in text  # which model the numbers are from
    listed = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    on_disk = {str(p.relative_to(paths.export)) for p in paths.export.rglob("*") if p.is_file() and p.name != ".stage.json"}
    assert listed == on_disk - {"export_report.json"} and "`export_report.json`" in text
    assert "![Training and validation loss](loss.png)" in text
    for how in ("AutoPeftModelForCausalLM", "llama-cli -m tiny-F16.gguf", "ollama create", "vllm serve"):
        assert how in text


def test_base_model_and_license_of_the_demo_come_from_its_gguf():
    from prodtune.card import base_license, base_model_id

    cfg = load_config("configs/demo.yaml")
    assert base_model_id(cfg) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_license(cfg) == "apache-2.0"


# ----------------------------------------------------------------------------- push

def test_push_dry_run_lists_the_files_of_each_kind(shipped, capsys):
    from prodtune.push import upload_plan

    arch, cfg, _ = shipped
    paths = RunPaths(cfg.run_dir)
    assert main(["push", "--run", str(paths.root), "--repo", "me/tiny", "--what", "gguf", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "https://huggingface.co/me/tiny" in out and "nothing was sent" in out
    listed = set(re.findall(r"^  (\S+)\s+[\d,.]+ MiB$", out, re.M))
    assert listed == {"tiny-F16.gguf", "tiny-Q8_0.gguf", "Modelfile", "README.md", "loss.png"}

    plan = upload_plan(paths.root, "me/tiny", "adapter")
    assert set(plan) >= {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"}
    assert json.loads(plan["adapter_config.json"])["base_model_name_or_path"] == f"tests/tiny-{arch}"
    assert b"library_name: peft" in plan["README.md"] and b'from_pretrained("me/tiny")' in plan["README.md"]
    merged = upload_plan(paths.root, "me/tiny", "merged")
    assert "model.safetensors" in merged and not any(n.endswith(".gguf") for n in merged)


def test_push_without_a_token_fails_in_one_line(shipped, monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    _, cfg, _ = shipped
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", "--run", cfg.run_dir.as_posix(), "--repo", "me/tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_TOKEN" in err and "nothing was uploaded" in err


def test_push_offline_fails_in_one_line(shipped, monkeypatch, capsys):
    _, cfg, _ = shipped
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main(["push", "--run", cfg.run_dir.as_posix(), "--repo", "me/tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Hugging Face Hub" in err


# ----------------------------------------------------------------------------- the shipped model, scored

@pytest.mark.parametrize("shipped", ["llama"], indirect=True)  # one architecture is enough for the plumbing
def test_compare_scores_the_exported_models_without_touching_compare(shipped):
    import pandas as pd

    from prodtune.evaluate import compare_stage

    arch, cfg, _ = shipped
    paths = RunPaths(cfg.run_dir)
    before = {p.name: p.read_bytes() for p in paths.compare.iterdir()}
    merged = compare_stage(cfg, which="merged")
    gguf = compare_stage(cfg, which="gguf")
    assert {p.name: p.read_bytes() for p in paths.compare.iterdir()} == before
    assert "(tuned = the exported merged)" in merged["summary"] and "(tuned = the exported gguf)" in gguf["summary"]
    adapter = pd.read_csv(paths.answers_csv, keep_default_na=False)
    for folder in ("compare-merged", "compare-gguf"):
        table = pd.read_csv(paths.root / folder / "answers.csv", keep_default_na=False)
        assert table["base_answer"].tolist() == adapter["base_answer"].tolist()  # the same base
        assert (paths.root / folder / "config.yaml").is_file()
    assert pd.read_csv(paths.root / "compare-merged" / "answers.csv", keep_default_na=False)["tuned_answer"].tolist() \
        == adapter["tuned_answer"].tolist()
    with pytest.raises(UserError, match="gguf-q4_k_m"):
        compare_stage(cfg, which="gguf-q4_k_m")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("formats, complaint", [
    ("", "export.formats is empty"),
    ("merged,gguf-q4km", "unknown"),
    ("gguf-iq2_xxs", "importance matrix"),
    ("merged,modelfile", "no GGUF"),
])
def test_bad_formats_are_one_line(formats, complaint, tmp_path, capsys):
    assert main(["export", f"output_dir={tmp_path}", f"export.formats={formats}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and complaint in err


def test_export_without_an_adapter_or_into_a_file_is_one_line(tmp_path, capsys):
    assert main(["export", f"output_dir={tmp_path}", "export.formats=merged"]) == 1
    assert "run 'prodtune train' first" in capsys.readouterr().err
    (tmp_path / "train" / "adapter").mkdir(parents=True)
    (tmp_path / "train" / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "export").write_text("not a folder")
    assert main(["export", f"output_dir={tmp_path}", "export.formats=merged"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err and "export" in err


def test_k_quant_without_llama_cpp_names_the_fix(monkeypatch, tmp_path, capsys):
    (tmp_path / "train" / "adapter").mkdir(parents=True)
    (tmp_path / "train" / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert main(["export", f"output_dir={tmp_path}", "export.formats=gguf-q4_k_m"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install llama-cpp-python" in err and "gguf-q8_0" in err


def test_interrupted_export_leaves_the_previous_export_whole(shipped, tmp_path, monkeypatch):
    import gguf

    from prodtune.export import export_stage

    _, cfg, _ = shipped
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run)
    before = {str(p.relative_to(run)): p.stat().st_size for p in (run / "export").rglob("*") if p.is_file()}
    original = gguf.GGUFWriter.write_tensors_to_file

    def interrupted(self, *args, **kwargs):
        self.fout[0].write(b"half a tensor")  # some bytes are on disk when the interrupt comes
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    again = load_config(run / "config.yaml", [f"output_dir={run}", "export.formats=merged,gguf-q8_0,card"])
    with pytest.raises(KeyboardInterrupt):
        export_stage(again)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", original)
    after = {str(p.relative_to(run)): p.stat().st_size for p in (run / "export").rglob("*") if p.is_file()}
    assert after == before
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and p.name not in (".stage.json", ".prodtune.lock")]
    assert leftovers == []


# ----------------------------------------------------------------------------- llama.cpp itself

LLAMA_CPP_TIE = 0.25
"""How far below transformers' best logit a token llama.cpp picks from a quantized GGUF may be (a near tie)."""

# Run in a child process: a crash inside llama.cpp (a CPU kernel it picks) fails this test, not the session.
LLAMA_CPP_GREEDY = r"""
import json, os, sys
import llama_cpp
job = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=job["path"], n_ctx=512, n_threads=2, seed=0, verbose=False)
tokens = []
for token in llm.generate(job["ids"], temp=0.0, top_k=1, repeat_penalty=1.0):
    tokens.append(token)
    if len(tokens) == job["n"]:
        break
print(json.dumps({"tokenized": llm.tokenize(job["text"].encode(), add_bos=False, special=True), "tokens": tokens}))
sys.stdout.flush()
os._exit(0)  # llama-cpp-python 0.3.36 may crash freeing its context at interpreter exit
"""


@pytest.mark.slow
def test_llama_cpp_runs_the_demo_gguf_as_transformers_does(tmp_path):
    """The demo model with a small LoRA adapter, exported by export_stage: llama.cpp (llama-cpp-python)
    tokenizes the chat prompt as transformers does; F16's 16 greedy tokens are transformers', Q8_0's and
    Q4_K_M's the first 8 (each pick within 0.25 logits of transformers' best)."""
    import subprocess

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp: "
                                            "pip install llama-cpp-python)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prodtune import models
    from prodtune.export import export_stage

    cfg = load_config("configs/demo.yaml", [f"output_dir={tmp_path}", "run_name=demo",
                                             "export.formats=merged,gguf-f16,gguf-q8_0,gguf-q4_k_m"])
    paths = RunPaths(tmp_path)
    base = models.local_model_path(cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)  # a trained-looking adapter: it moves the answers, not wrecks them
    model.save_pretrained(paths.adapter)
    tok = models.load_tokenizer(cfg.model, base)
    tok.save_pretrained(paths.adapter)
    export_stage(cfg)
    assert paths.gguf("demo", "q4_k_m").stat().st_size < paths.gguf("demo", "q8_0").stat().st_size

    messages = [{"role": "system", "content": cfg.data.system_prompt},
                {"role": "user", "content": "Describe the product 'The Very Hungry Caterpillar'."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for gguf_type in ("f16", "q8_0", "q4_k_m"):
        path = paths.gguf("demo", gguf_type)
        job = json.dumps({"path": str(path), "ids": ids, "text": text, "n": 16})
        done = subprocess.run([sys.executable, "-c", LLAMA_CPP_GREEDY], input=job, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"llama.cpp on {path.name}: exit {done.returncode}: {done.stderr[-500:]}"
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        assert theirs["tokenized"] == ids, gguf_type
        model = _load_gguf(path)
        ours = _greedy(model, torch.tensor([ids]), n=16)
        if gguf_type == "f16":
            assert theirs["tokens"] == ours
            continue
        # For Q8_0 and K-quants llama.cpp also rounds the activations to 8 bits before its integer dot
        # products; transformers multiplies the dequantized weights in float32. Where two tokens are
        # nearly tied the two can pick differently: every token llama.cpp picks must be transformers'
        # first choice or within LLAMA_CPP_TIE logits of it, the first 8 exactly the same.
        assert theirs["tokens"][:8] == ours[:8], gguf_type
        with torch.no_grad():
            logits = model(torch.tensor([ids + theirs["tokens"]])).logits[0, len(ids) - 1:-1]
        gaps = logits.max(-1).values - logits.gather(1, torch.tensor(theirs["tokens"])[:, None])[:, 0]
        assert gaps.max() <= LLAMA_CPP_TIE, (gguf_type, gaps.tolist())
