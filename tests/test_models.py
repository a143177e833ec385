"""Model loading, precision, 4-bit quantization and LoRA target resolution (tiny offline models)."""

from __future__ import annotations

import pytest
import torch

from prodtune import models
from prodtune.config import ModelConfig
from prodtune.errors import UserError

PHI3_LINEAR = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def phi3():
    from tiny import build_phi3, build_tokenizer

    return build_phi3(build_tokenizer())


@pytest.fixture(scope="module")
def llama():
    from tiny import build_llama, build_tokenizer

    return build_llama(build_tokenizer())


def test_linear_module_names_exclude_the_output_head(phi3, llama):
    assert models.linear_module_names(phi3) == PHI3_LINEAR
    assert models.linear_module_names(llama) == LLAMA_LINEAR


def test_all_linear_keeps_phi3_fused_names(phi3, llama):
    assert models.resolve_lora_targets(phi3, "all-linear") == PHI3_LINEAR
    assert models.resolve_lora_targets(llama, "all-linear") == LLAMA_LINEAR


def test_explicit_targets_are_checked_and_kept(phi3, llama):
    assert models.resolve_lora_targets(phi3, ["qkv_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    assert models.resolve_lora_targets(llama, "q_proj, v_proj") == ["q_proj", "v_proj"]


def test_unknown_target_lists_the_model_linear_modules(llama):
    with pytest.raises(UserError) as e:
        models.resolve_lora_targets(llama, ["q_proj", "query_key_value"])
    message = str(e.value)
    assert "query_key_value" in message and "LlamaForCausalLM" in message
    assert all(name in message for name in LLAMA_LINEAR)


def test_unfused_names_on_phi3_point_to_the_fused_ones(phi3):
    # The original recipe's list: these names exist only in re-packed copies of Phi-3.
    recipe = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(UserError) as e:
        models.resolve_lora_targets(phi3, recipe)
    message = str(e.value)
    assert "qkv_proj" in message and "gate_up_proj" in message
    assert "['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']" in message


def test_cpu_precision_is_float32_unless_set():
    assert models.compute_dtype(ModelConfig(dtype="auto"), "cpu") == torch.float32
    assert models.compute_dtype(ModelConfig(dtype="bfloat16"), "cpu") == torch.bfloat16
    with pytest.raises(UserError, match="float16"):
        models.compute_dtype(ModelConfig(dtype="float16"), "cpu")


def test_pick_device_on_a_machine_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert models.pick_device("auto") == "cpu"
    with pytest.raises(UserError, match="train.device"):
        models.pick_device("cuda")


def test_quantization_config_is_nf4_double_quant():
    assert models.quantization_config(ModelConfig(load_in_4bit=False), torch.bfloat16) is None
    q = models.quantization_config(ModelConfig(load_in_4bit=True), torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert models.quantization_config(ModelConfig(load_in_4bit=True), torch.float32, enabled=False) is None


def test_load_model_4bit_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), load_in_4bit=True)
    model = models.load_model(cfg, "cpu", training=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())  # frozen for QLoRA
    # The fused Phi-3 names survive quantization (Linear4bit subclasses nn.Linear).
    assert models.resolve_lora_targets(model, "all-linear") == PHI3_LINEAR


def test_load_model_with_missing_adapter_is_a_user_error(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    with pytest.raises(UserError, match="prodtune train"):
        models.load_model(cfg, "cpu", adapter=tmp_path / "nothing")


def test_cpu_4bit_gradients_survive_an_eval_pass(tiny_model_dir):
    """Regression: bitsandbytes' CPU eval-mode repacking must not cut the backward pass."""
    from peft import get_peft_model

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), load_in_4bit=True)
    ids = torch.randint(0, 500, (2, 16))

    def lora_grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = models.load_model(cfg, "cpu", training=True)
        model = get_peft_model(model, models.peft_lora_config(4, 8, 0.0, PHI3_LINEAR))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # non-zero, so gradients reach lora_A too
        if eval_first:  # what a validation pass does
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = lora_grads(False), lora_grads(True)
    for name in plain:
        assert torch.allclose(plain[name], after_eval[name], atol=1e-6), name
