"""The GPU speed paths (prodtune.fast), checked on the CPU with the tiny random Phi-3:
the plan picked per card, the packed batches (prompt masking, restarting positions, one shape),
no attention across packed examples (varlen attention's CPU reference of the same mask), the
packed + dequantized path's loss against the plain padded path, and regional compilation: one
graph for every decoder layer, never recompiled between batches. GPU-only checks (flash
attention's varlen kernel, FlexAttention) carry the gpu marker."""

from __future__ import annotations

import pytest
import torch

from prodtune import fast
from prodtune.config import ModelConfig, TrainConfig
from prodtune.errors import UserError

MAX_LEN = 128


H100 = fast.Card(80.0, (9, 0), True)  # planning for an 80 GiB Hopper card, no GPU needed

def cpu_plan(dequantize: bool = False, rows: int = 2) -> fast.SpeedPlan:
    """What the fast path does, minus what needs CUDA (flex attention, bf16, inductor)."""
    return fast.SpeedPlan("fast", "cpu test", rows=rows, max_length=MAX_LEN, checkpoint_every=0,
                          dequantize_once=dequantize, attn_implementation="sdpa")


def make_trainer(model_dir, tmp_path, speed: fast.SpeedPlan, load_in_4bit: bool = False, n_rows: int = 12,
                 cls=None, whole: bool = False, **extra):
    """An SFTTrainer (or `cls`) over format-stage rows, set up the way train.py does plus fast's overrides:
    the model prepared (`fast.prepare`), or with `whole` the trainer (`fast.prepare_trainer`: its collator too)."""
    from datasets import Dataset
    from peft import LoraConfig
    from tiny_run import product_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32) if load_in_4bit else None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quant,
                                                 attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in product_rows(n_rows)]
    args = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=speed.rows,
                gradient_accumulation_steps=speed.grad_accum, max_length=MAX_LEN, packing=True,
                completion_only_loss=True, bf16=False, use_cpu=True,
                report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
                optim="adamw_torch", shuffle_dataset=False)
    args.update(fast.sft_overrides(speed))
    args.update(extra)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = (cls or SFTTrainer)(model=model, args=SFTConfig(**args), train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora)
    if whole:
        fast.prepare_trainer(trainer, speed)
    else:
        fast.prepare(trainer.model, speed)
    return trainer


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("gib, path, rows, accum, ckpt", [
    (80, "fast", 8, 1, 2),      # H100: 16k-token micro-batches, every other layer checkpointed
    (141, "fast", 8, 1, 0),     # H200: no checkpointing (4N FLOPs per token)
    (40, "fast", 8, 1, 1),      # A100 40 GB: every layer checkpointed
    (22, "small", 4, 2, 1),     # L4: 8k tokens, checkpointing (inputs offloaded), 4-bit weights dequantized per use
])
def test_plan_follows_card_memory(gib, path, rows, accum, ckpt):
    p = fast.plan(TrainConfig(), ModelConfig(load_in_4bit=True), "cuda", card=fast.Card(gib, (8, 9), True))
    assert (p.path, p.rows, p.grad_accum, p.checkpoint_every) == (path, rows, accum, ckpt)
    assert p.tokens_per_microbatch * p.grad_accum == TrainConfig().step_tokens
    assert p.dequantize_once == (path == "fast") and p.compile  # small compiles its 4-bit layers too
    assert p.offload == (path == "small")
    assert fast.sft_overrides(p)["activation_offloading"] == p.offload


def test_small_plan_offloads_only_what_it_measured():
    """Offloading needs every layer checkpointed; a T4 (no flash attention) and FSDP keep it off,
    with the resident 4k-token micro-batch, and FSDP runs eagerly."""
    cfg, l4, t4 = ModelConfig(load_in_4bit=True), fast.Card(22, (8, 9), True), fast.Card(15, (7, 5), False)
    sharded = fast.plan(TrainConfig(), cfg, "cuda", card=l4, sharded=True)
    assert (sharded.offload, sharded.compile, sharded.rows) == (False, False, 2)
    assert not fast.plan(TrainConfig(), cfg, "cuda", card=t4).offload
    no_ckpt = fast.plan(TrainConfig(gradient_checkpointing=False), cfg, "cuda", card=l4)
    assert (no_ckpt.checkpoint_every, no_ckpt.offload) == (0, False)
    assert "offloaded" in fast.plan(TrainConfig(), cfg, "cuda", card=l4).describe()


@pytest.mark.parametrize("step_tokens, rows, accum", [
    (65536, 8, 4),   # 4 GPUs can each keep a full 8-row micro-batch
    (32768, 8, 2),
    (4096, 2, 1),    # a step smaller than one micro-batch takes fewer rows
    (2048, 1, 1),
])
def test_plan_step_tokens(step_tokens, rows, accum):
    p = fast.plan(TrainConfig(step_tokens=step_tokens), ModelConfig(load_in_4bit=True), "cuda", card=H100)
    assert (p.rows, p.grad_accum) == (rows, accum)
    assert p.tokens_per_microbatch * p.grad_accum == step_tokens


def test_plan_respects_settings_and_devices():
    cfg = ModelConfig(load_in_4bit=True)
    assert fast.plan(TrainConfig(), cfg, "cpu").path == "plain"
    assert fast.plan(TrainConfig(speed="plain"), cfg, "cuda", card=H100).path == "plain"
    assert fast.plan(TrainConfig(packing=False), cfg, "cuda", card=H100).path == "plain"
    assert fast.plan(TrainConfig(speed="small"), cfg, "cuda", card=H100).path == "small"
    no_ckpt = fast.plan(TrainConfig(gradient_checkpointing=False), cfg, "cuda", card=H100)
    assert (no_ckpt.checkpoint_every, no_ckpt.compile) == (0, True)
    assert fast.plan(TrainConfig(gradient_checkpointing=True), cfg, "cuda", card=H100).checkpoint_every == 1
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        fast.plan(TrainConfig(speed="fast"), cfg, "cpu")
    with pytest.raises(UserError, match="packing=false"):
        fast.plan(TrainConfig(speed="fast", packing=False), cfg, "cuda", card=H100)
    assert fast.sft_overrides(fast.plan(TrainConfig(), cfg, "cpu")) == {}


# ----------------------------------------------------------------------------- packed batches

def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    return list(zip(starts, starts[1:]))


def test_packed_batch_masks_prompts_and_restarts_positions(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, cpu_plan())
    tok = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # padding-free: documents are told apart by position ids
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    assert batch["input_ids"].shape == (1, 2 * MAX_LEN)  # always rows x max_length: one shape
    examples = 0
    for start, stop in segments(pos):
        seg_ids, seg_labels = ids[start:stop], labels[start:stop]
        assert pos[start:stop].tolist() == list(range(stop - start))
        assert seg_labels[0] == -100  # never predicts across the boundary from the previous example
        if stop - start == 1:  # the tail padding: 1-token pseudo-examples, no loss
            assert seg_ids[0] == tok.pad_token_id
            continue
        examples += 1
        trained = (seg_labels != -100).nonzero().flatten()
        first = int(trained[0])
        assert (seg_labels[first:] == seg_ids[first:]).all()  # the whole completion is trained
        assert (seg_labels[:first] == -100).all()  # no prompt token is
        prompt, completion = tok.decode(seg_ids[:first]), tok.decode(seg_ids[first:])
        assert prompt.startswith("<|system|>") and prompt.rstrip().endswith("<|assistant|>")
        assert "<|end|>" in completion and "<|user|>" not in completion  # end-of-turn is trained
    assert examples >= 2


def test_packed_attention_does_not_cross_examples(tiny_model_dir):
    """Per-token log-probs of packed examples equal those of each example run alone; the
    same tokens without restarting positions (attention across examples) do not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # larger weights, so that the output depends on the context
        for p in model.parameters():
            p.mul_(8.0)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 12, 5, 9]
    seqs = [torch.randint(10, model.config.vocab_size, (n,), generator=g) for n in lengths]

    def logprobs(ids, pos):
        with torch.no_grad():
            logits = model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
        return logits.log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]

    alone = [logprobs(s, torch.arange(len(s))) for s in seqs]
    packed_ids = torch.cat(seqs)
    restart = torch.cat([torch.arange(n) for n in lengths])
    packed = logprobs(packed_ids, restart)
    leaky = logprobs(packed_ids, torch.arange(len(packed_ids)))
    offset = 0
    worst_leak = 0.0
    for s, ref in zip(seqs, alone):
        n = len(s)
        torch.testing.assert_close(packed[offset:offset + n - 1], ref, rtol=1e-5, atol=1e-4)
        worst_leak = max(worst_leak, float((leaky[offset:offset + n - 1] - ref).abs().max()))
        offset += n
    assert worst_leak > 1e-2  # the check above would catch attention across examples


def test_fast_path_loss_matches_plain_padded_path(tiny_model_dir, tmp_path):
    """The issue's check: one batch through the plain padded path (4-bit weights dequantized per
    call) and through the packed path (bf16 copy... here fp32 on the CPU) agree within 1e-2."""
    plain = make_trainer(tiny_model_dir, tmp_path / "plain", fast.SpeedPlan("plain", "reference"), load_in_4bit=True)
    quick = make_trainer(tiny_model_dir, tmp_path / "fast", cpu_plan(dequantize=True), load_in_4bit=True)
    assert any(hasattr(m, "prodtune_weight") for m in quick.model.modules())
    # Same LoRA weights in both, with B != 0 so the adapter path counts.
    g = torch.Generator().manual_seed(1)
    quick_params = dict(quick.model.named_parameters())
    for name, p in plain.model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                quick_params[name].copy_(p)
    feats = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in plain.train_dataset.select(range(6))]
    losses, grads = [], []
    for trainer in (plain, quick):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(feats))
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad]))
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-2
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-5  # fp32 on the CPU: in fact the same
    # TRL keeps a 4-bit base's LoRA weights (and so their gradients) in bf16: compare as a whole.
    assert float((grads[1].float() - grads[0].float()).norm() / grads[0].float().norm()) < 1e-2


def packed_kwargs(lengths: list[int], vocab: int = 500) -> dict:
    """One padding-free micro-batch as TRL's collator gives it: restarting positions and boundaries."""
    ids = torch.randint(10, vocab, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return dict(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                max_length_k=max(lengths), seq_idx=torch.repeat_interleave(torch.arange(len(lengths)),
                                                                           torch.tensor(lengths))[None],
                use_cache=False)


def four_layer_lora(tiny_model_dir, seed: int = 0):
    """The tiny Phi-3's shape with 4 decoder layers, LoRA on every linear layer (B != 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir, num_hidden_layers=4)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def test_one_compile_serves_every_layer_and_every_batch(tiny_model_dir):
    """Regional compilation: the decoder block is compiled ONCE for 4 identical layers (not once
    per layer), batches with other example boundaries reuse it, the outputs and gradients are the
    eager ones, and validation (no gradients) runs eagerly without a compile of its own."""
    eager, compiled = four_layer_lora(tiny_model_dir), four_layer_lora(tiny_model_dir)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    speed = fast.SpeedPlan("fast", "cpu test", rows=1, max_length=64, checkpoint_every=0,
                           attn_implementation=fast.VARLEN)
    fast.prepare(eager, speed)
    fast.prepare(compiled, speed)
    torch._dynamo.reset()
    compiled.get_base_model().enable_input_require_grads()  # what fast.prepare does before compiling
    assert fast.compile_layers(compiled.get_base_model(), backend=counting_backend) == 4
    for lengths in ([7, 11, 14], [20, 12], [3, 5, 6, 8, 10]):
        kwargs = packed_kwargs(lengths)
        out_c, out_e = compiled(**kwargs).logits, eager(**kwargs).logits
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        out_c.sum().backward()
        out_e.sum().backward()
        assert len(graphs) == 1, f"{len(graphs)} compiled graphs for 4 identical layers"
    grads = [(p.grad, q.grad) for p, q in zip(compiled.parameters(), eager.parameters()) if p.requires_grad]
    assert grads and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in grads)
    with torch.no_grad():
        compiled(**packed_kwargs([9, 9]))
    assert len(graphs) == 1


def test_one_compile_when_the_block_runs_in_another_thread(tiny_model_dir):
    """A checkpointed block is run again by autograd's own thread, whose torch thread count differs
    (the DataLoader's pin-memory thread sets 1): still one compiled graph."""
    import threading

    model = four_layer_lora(tiny_model_dir)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fast.prepare(model, fast.SpeedPlan("fast", "cpu test", rows=1, max_length=64, checkpoint_every=0,
                                       attn_implementation=fast.VARLEN))
    torch._dynamo.reset()
    model.get_base_model().enable_input_require_grads()
    fast.compile_layers(model.get_base_model(), backend=counting_backend)
    main_threads = torch.get_num_threads()
    model(**packed_kwargs([7, 9])).logits.sum().backward()

    def other_thread():
        torch.set_num_threads(1 if main_threads > 1 else 2)
        model(**packed_kwargs([5, 11])).logits.sum().backward()

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert len(graphs) == 1, f"{len(graphs)} compiled graphs"
    assert torch.get_num_threads() == main_threads


def test_varlen_attention_does_not_cross_examples(tiny_model_dir):
    """The speed paths' attention, through transformers with TRL's boundaries (its CPU reference
    here; the GPU test checks the flash kernel): packed log-probs equal each example's alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    fast.prepare(model, fast.SpeedPlan("fast", "cpu test", rows=1, max_length=64, checkpoint_every=0,
                                       attn_implementation=fast.VARLEN))
    assert model.config._attn_implementation == fast.VARLEN
    lengths = [7, 12, 5, 9]
    kwargs = packed_kwargs(lengths, model.config.vocab_size)
    ids = kwargs["input_ids"][0]

    def logprobs(logits, ids):
        return logits.log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]

    with torch.no_grad():
        packed = logprobs(model(**kwargs).logits[0], ids)
        offset = 0
        for n in lengths:
            alone = logprobs(model(input_ids=ids[None, offset:offset + n], use_cache=False).logits[0],
                             ids[offset:offset + n])
            torch.testing.assert_close(packed[offset:offset + n - 1], alone, rtol=1e-5, atol=1e-4)
            offset += n
        del kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]  # no boundaries: one causal sequence
        leaky = logprobs(model(**kwargs).logits[0], ids)
    assert float((leaky - packed).abs().max()) > 1e-2  # the check above would catch a leak


def test_varlen_forward_builds_no_mask(tiny_model_dir, monkeypatch):
    """transformers builds no mask for varlen attention and so never runs its packed-sequence check
    (a read of the GPU at the start of every forward)."""
    from transformers import AutoModelForCausalLM, masking_utils

    def no_check(*args, **kwargs):
        raise AssertionError("transformers checked for packed sequences")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_check)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    fast.prepare(model, fast.SpeedPlan("fast", "cpu test", rows=1, max_length=64, checkpoint_every=0,
                                       attn_implementation=fast.VARLEN))
    with torch.no_grad():
        assert model(**packed_kwargs([7, 12, 5], model.config.vocab_size)).logits.shape[1] == 24


def test_dequantized_layers_share_one_class(tiny_model_dir, tmp_path):
    """Every 4-bit LoRA layer gets the dense forward through one subclass (compiled code sees one
    module type in every decoder layer), still peft's LoRA layer for saving and merging."""
    from peft.tuners.lora import LoraLayer

    trainer = make_trainer(tiny_model_dir, tmp_path, cpu_plan(dequantize=True), load_in_4bit=True)
    dense = [m for m in trainer.model.modules() if hasattr(m, "prodtune_weight")]
    assert len(dense) == 2 * 4 and len({type(m) for m in dense}) == 1  # 2 layers x 4 projections
    assert all(isinstance(m, LoraLayer) for m in dense)
    assert "prodtune_weight" not in "".join(trainer.model.state_dict())  # not saved with the adapter


def test_cast_frozen_keeps_trainable_params():
    layer = torch.nn.Linear(4, 4)
    lora = torch.nn.Linear(4, 2)
    layer.weight.requires_grad_(False)
    model = torch.nn.ModuleDict({"base": layer, "lora": lora})
    assert fast.cast_frozen(model) == 1
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    assert lora.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- no waiting in a step

def test_trainer_class_by_path():
    from trl import SFTTrainer

    assert fast.trainer_class(fast.SpeedPlan("plain", "reference")) is SFTTrainer
    sync_free = fast.trainer_class(cpu_plan())
    assert issubclass(sync_free, SFTTrainer) and sync_free is not SFTTrainer
    assert fast.trainer_class(fast.SpeedPlan("small", "x", rows=1)) is sync_free  # one class


@pytest.mark.parametrize("accum", [1, 2])
def test_sync_free_trainer_trains_counts_and_logs_like_trl(tiny_model_dir, tmp_path, accum):
    """The speed paths' trainer (no GPU reads inside a step, each log written a step late) against
    TRL's own: the same log rows (losses, gradient norms, learning rates, steps, epochs, tokens seen,
    metric names) in the same order, the same tokens seen at every step and the same final training
    loss; entropy and token accuracy are the same numbers with one micro-batch per step
    (token-weighted over the micro-batches otherwise)."""
    speed = fast.SpeedPlan("fast", "cpu test", rows=1, max_length=MAX_LEN, grad_accum=accum, checkpoint_every=0,
                           attn_implementation="sdpa")
    logs, tokens, final = {}, {}, {}
    for name, cls in (("trl", None), ("ours", fast.trainer_class(speed))):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_model_dir, tmp_path / name, speed, n_rows=24, cls=cls, max_steps=3,
                               logging_steps=1, include_num_input_tokens_seen="non_padding", learning_rate=1e-3)
        seen = []

        from transformers import TrainerCallback

        class Seen(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                seen.append(state.num_input_tokens_seen)

        trainer.add_callback(Seen())
        final[name] = trainer.train().training_loss
        logs[name] = [row for row in trainer.state.log_history if "loss" in row]
        tokens[name] = seen
    assert tokens["ours"] == tokens["trl"] and tokens["trl"][-1] > 0
    assert [len(logs["ours"]), len(logs["trl"])] == [3, 3]
    assert final["ours"] == pytest.approx(final["trl"], rel=1e-5)
    for ours, trl in zip(logs["ours"], logs["trl"]):
        assert set(trl) <= set(ours)
        for key in ("step", "epoch", "learning_rate", "num_input_tokens_seen"):
            assert ours[key] == trl[key], key
        assert ours["loss"] == pytest.approx(trl["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(trl["grad_norm"], rel=1e-4)
        assert ours["num_tokens"] == trl["num_tokens"] and ours["num_input_tokens_seen"] == trl["num_input_tokens_seen"]
        tol = 1e-5 if accum == 1 else 5e-2
        assert ours["entropy"] == pytest.approx(trl["entropy"], rel=tol)
        assert ours["mean_token_accuracy"] == pytest.approx(trl["mean_token_accuracy"], rel=tol, abs=1e-6)


def test_late_logs_keep_their_place_around_evaluation(tiny_model_dir, tmp_path):
    """Logging every step and evaluating every second one: a late log is written before anything of
    the next step (its evaluation included), an evaluating step logs at once, no log is lost."""
    from datasets import Dataset

    speed = cpu_plan(rows=1)
    history = {}
    for name, cls in (("trl", None), ("ours", fast.trainer_class(speed))):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_model_dir, tmp_path / name, speed, n_rows=24, cls=cls, max_steps=5,
                               logging_steps=1, learning_rate=1e-3)
        from transformers.trainer_utils import IntervalStrategy

        trainer.eval_dataset = Dataset.from_dict(trainer.train_dataset[:2])  # tokenized already
        trainer.args.eval_strategy, trainer.args.eval_steps = IntervalStrategy.STEPS, 2
        trainer.train()
        history[name] = [(row["step"], "eval_loss" in row, "loss" in row) for row in trainer.state.log_history]
    assert history["ours"] == history["trl"]
    assert [step for step, _, is_loss in history["ours"] if is_loss] == [1, 2, 3, 4, 5]


def test_longest_example_reads_packed_and_unpacked_datasets():
    from datasets import Dataset

    packed = Dataset.from_dict({"input_ids": [[1] * 10, [1] * 7], "seq_lengths": [[4, 6], [7]]})
    plain = Dataset.from_dict({"input_ids": [[1] * 3, [1] * 9]})
    assert fast.longest_example(packed) == 7
    assert fast.longest_example(plain, {"a": packed}) == 9
    assert fast.longest_example(None, Dataset.from_dict({"text": ["x"]})) is None


def test_attention_bound_is_the_longest_example_unless_a_batch_is_longer():
    from prodtune.attention import steady_kwargs

    hook = steady_kwargs(64, keep_boundaries=True, longest=20)
    for here, bound in ((14, 20), (20, 20), (21, 64)):  # a longer example than the data's: the row length
        _, kwargs = hook(None, (), packed_kwargs([here, 3]))
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == bound and "seq_idx" not in kwargs
    _, kwargs = steady_kwargs(64, keep_boundaries=True)(None, (), packed_kwargs([5]))
    assert kwargs["max_length_q"] == 64


def test_prepare_sizes_attention_to_the_data(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, fast.SpeedPlan("fast", "cpu test", rows=2, max_length=MAX_LEN,
                                                                    checkpoint_every=0))
    longest = fast.longest_example(trainer.train_dataset)
    assert longest == max(n for row in trainer.train_dataset["seq_lengths"] for n in row)
    speed = fast.SpeedPlan("fast", "cpu test", rows=2, max_length=MAX_LEN, checkpoint_every=0,
                           attn_implementation=fast.VARLEN)
    assert fast.prepare(trainer.model, speed, longest=50)["attention_bound"] == 50
    assert fast.prepare(trainer.model, speed, longest=5000)["attention_bound"] == MAX_LEN  # never past the row


def test_padding_becomes_one_segment_and_the_loss_stays(tiny_model_dir, tmp_path):
    """The padding at the end of a packed micro-batch (TRL: one 1-token example per pad token) becomes
    one segment; the boundaries of the real examples, and the loss and gradients, stay the same."""
    trainer = make_trainer(tiny_model_dir, tmp_path, fast.SpeedPlan("fast", "cpu test", rows=2, max_length=MAX_LEN,
                                                                    checkpoint_every=0, attn_implementation=fast.VARLEN))
    fast.prepare(trainer.model, fast.SpeedPlan("fast", "cpu test", rows=2, max_length=MAX_LEN, checkpoint_every=0,
                                               attn_implementation=fast.VARLEN))
    feats = [{k: r[k] for k in ("input_ids", "completion_mask", "seq_lengths") if k in r}
             for r in trainer.train_dataset.select(range(2))]
    before = trainer.data_collator(feats)
    after = fast.OnePaddingSegment(trainer.data_collator)(feats)
    lengths, merged = before["cu_seq_lens_q"].diff().tolist(), after["cu_seq_lens_q"].diff().tolist()
    pads = len(lengths) - len([n for n in lengths if n > 1])
    assert pads >= 2, "the test needs padding at the end of the micro-batch"
    assert merged == [n for n in lengths if n > 1] + [pads]
    assert after["max_length_q"] == max(merged) and after["seq_idx"].shape == before["seq_idx"].shape
    assert int(after["seq_idx"][0, -1]) == len(merged) - 1
    results = []
    for batch in (before, after):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        results.append((float(loss), torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                                if p.requires_grad])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_8bit_adamw_steps_without_device_syncs_and_the_same_numbers(monkeypatch):
    """bitsandbytes' non-paged 8-bit AdamW steps without its sync after every tensor, to the same
    values; paged optimizers and other optimizers are left alone."""
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer as bnb_optim

    calls = []
    monkeypatch.setattr(bnb_optim, "sync_gpu", lambda t: calls.append(t))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-ins for a GPU's streams
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "default")
    monkeypatch.setattr(torch.cuda, "default_stream", lambda: "default")
    params = []
    for patched in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4096))
        opt = bnb.optim.AdamW8bit([p], lr=1e-2)
        if patched:
            assert fast.step_without_device_syncs(opt)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        params.append(p.detach().clone())
        assert (len(calls) > 0) != patched
        calls.clear()
    torch.testing.assert_close(params[0], params[1])
    assert bnb_optim.sync_gpu is not fast._no_sync  # put back after each step
    assert not fast.step_without_device_syncs(bnb.optim.PagedAdamW8bit([torch.nn.Parameter(torch.randn(8))]))
    assert not fast.step_without_device_syncs(torch.optim.AdamW([torch.nn.Parameter(torch.randn(8))]))


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("attn", [fast.VARLEN, "flex_attention"])
@pytest.mark.parametrize("compiled", [False, True])
def test_packed_attention_matches_alone_on_gpu(tiny_model_dir, compiled, attn):
    """The speed paths' attention (flash attention's varlen kernel, or FlexAttention with the
    document mask; in compiled layers or not) in bf16: packed per-token log-probs and weight
    gradients equal those of each example alone."""
    from transformers import AutoModelForCausalLM

    def build():
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        with torch.no_grad():  # larger weights, so that the output depends on the context
            for p in m.parameters():
                p.mul_(8.0)
        # The bound the data gives (its longest example, 200 tokens), not the 256-token row.
        fast.prepare(m.cuda(), fast.SpeedPlan("fast", "gpu test", rows=1, max_length=256, compile=compiled,
                                              checkpoint_every=0, attn_implementation=attn), longest=200)
        return m

    # The same kernel packed and alone (flash attention in bf16, the rest fp32): any difference is
    # attention across examples, not rounding.
    torch._dynamo.reset()
    model, ref = build(), build()
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [70, 130, 45, 200, 67]
    seqs = [torch.randint(10, model.config.vocab_size, (n,), device="cuda", generator=g) for n in lengths]

    def logprobs(m, ids, lengths):
        pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        logits = m(input_ids=ids[None], position_ids=pos[None], use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=max(lengths), max_length_k=max(lengths)).logits[0].float()
        return logits.log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]

    alone = [logprobs(ref, s, [len(s)]) for s in seqs]
    torch.stack([a.sum() for a in alone]).sum().backward()
    packed = logprobs(model, torch.cat(seqs), lengths)
    keep = torch.ones(len(packed), dtype=torch.bool, device="cuda")
    keep[torch.tensor(lengths, device="cuda").cumsum(0)[:-1] - 1] = False  # predictions across a boundary
    packed[keep].sum().backward()
    err = float((packed[keep] - torch.cat(alone)).abs().max())
    assert err < 0.1, f"max |packed - alone| log-prob difference {err:.3g}"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        rel = float((p.grad - q.grad).norm() / q.grad.norm().clamp(min=1e-12))
        assert rel < 1e-2, f"{name}: gradient differs by {rel:.3g} (relative)"


@pytest.mark.gpu
def test_sync_free_trainer_does_not_wait_for_the_gpu(tiny_model_dir, tmp_path):
    """Inside the optimizer steps after the first, the speed paths' trainer (as prepare_trainer sets it
    up) never reads the GPU back: not for token counts, NaN checks, TRL's metrics or a log at every
    step, not in the LM head (positions from the collator, not a boolean mask) nor for transformers'
    packed-sequence check, and no bitsandbytes sync per tensor. TRL's own trainer reads at each of
    those. torch's sync debug mode warns at every such read."""
    import warnings

    from transformers import TrainerCallback

    speed = fast.SpeedPlan("fast", "gpu test", rows=2, max_length=MAX_LEN, grad_accum=2, checkpoint_every=0,
                           attn_implementation=fast.VARLEN, bf16_frozen=True)
    import bitsandbytes.optim.optimizer as bnb_optim

    reads, device_syncs = {}, {}
    real_sync = bnb_optim.sync_gpu
    for name, cls in (("trl", None), ("ours", fast.trainer_class(speed))):
        device_syncs[name] = 0

        def counted(tensor, _name=name):
            device_syncs[_name] += 1
            real_sync(tensor)

        bnb_optim.sync_gpu = counted
        trainer = make_trainer(tiny_model_dir, tmp_path / name, speed, n_rows=48, cls=cls, max_steps=4,
                               whole=cls is not None, logging_steps=1, include_num_input_tokens_seen="non_padding",
                               use_cpu=False, bf16=True, optim="adamw_8bit")
        trainer.model.cuda()

        class Armed(TrainerCallback):  # from the end of step 1 to the end of step 3: two whole steps
            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.set_sync_debug_mode("warn" if state.global_step in (1, 2) else 0)

        trainer.add_callback(Armed())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.train()
            finally:
                torch.cuda.set_sync_debug_mode(0)
                bnb_optim.sync_gpu = real_sync
        reads[name] = [f"{w.filename.split('/')[-1]}:{w.lineno}" for w in caught
                       if "synchronizing" in str(w.message)]
    assert reads["ours"] == [], reads["ours"]
    assert len(reads["trl"]) > 4 * 2 * speed.grad_accum, reads  # the head's 4 per micro-batch, and more
    assert device_syncs["trl"] > 0 and device_syncs["ours"] == 0, device_syncs  # bitsandbytes' per tensor
