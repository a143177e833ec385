"""The LM head that selects labelled positions by index (prodtune.lm_head) against TRL's fused head,
which selects them with a boolean mask: the same outputs, loss and gradients, packed or padded, in
training and evaluation; TRL's forward wherever this path does not apply."""

from __future__ import annotations

import pytest
import torch

from prodtune import fast, lm_head
from test_fast import cpu_plan, make_trainer


def test_positions_index_the_next_token_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7],
                           [-100, 8, -100, -100, 9, 10]])
    positions = lm_head.label_positions(labels)
    grid = labels[:, 1:].reshape(-1)
    assert grid[positions].tolist() == [5, 6, 7, 8, 9, 10]
    assert positions.dtype == torch.int64 and len(positions) == int((labels[:, 1:] != -100).sum())
    # the hidden state that predicts each of them: the token before it, in the (rows, length) layout
    hidden_index = positions + positions // (labels.size(1) - 1)
    assert labels.reshape(-1)[hidden_index + 1].tolist() == [5, 6, 7, 8, 9, 10]


def _outputs(model, batch, positions=None):
    model.zero_grad()
    extra = {} if positions is None else {lm_head.POSITIONS: positions}
    out = model(**batch, **extra, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(ours, trl):
    (a, ga), (b, gb) = ours, trl
    assert torch.equal(a.label_mask, b.label_mask)
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)
    assert torch.equal(a.is_top1.bool(), b.is_top1.bool())
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_scores_like_trls_mask(tiny_model_dir, tmp_path):
    """A padding-free packed micro-batch (one flattened row of several examples, padding at its end)."""
    trainer = make_trainer(tiny_model_dir, tmp_path, cpu_plan(rows=2))
    model = trainer.model.get_base_model()
    feats = [{k: r[k] for k in ("input_ids", "completion_mask", "seq_lengths") if k in r}
             for r in trainer.train_dataset.select(range(2))]
    batch = trainer.data_collator(feats)
    trl = _outputs(trainer.model, batch)
    assert lm_head.select_by_position(model)
    with_positions = lm_head.LabelPositions(trainer.data_collator)(feats)
    positions = with_positions.pop(lm_head.POSITIONS)
    assert with_positions.keys() == batch.keys() and 0 < len(positions) < batch["labels"].numel()
    _assert_same(_outputs(trainer.model, batch, positions), trl)
    # without positions (or with an all-unlabelled batch) it is TRL's forward
    _assert_same(_outputs(trainer.model, batch), trl)
    none = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    out, _ = _outputs(trainer.model, none, lm_head.label_positions(none["labels"]))
    assert float(out.loss) == 0.0 and not out.label_mask.any()


def test_padded_rows_score_like_trls_mask(tiny_llama_dir, tmp_path):
    """Rows of a padded batch (the original recipe's layout): positions index every row."""
    trainer = make_trainer(tiny_llama_dir, tmp_path, cpu_plan(rows=2))
    model = trainer.model.get_base_model()
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    trl = _outputs(trainer.model, batch)
    assert lm_head.select_by_position(model)
    _assert_same(_outputs(trainer.model, batch, lm_head.label_positions(labels)), trl)


def test_only_models_with_plain_heads_and_a_fused_forward(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert not lm_head.select_by_position(AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # no fused head
    trainer = make_trainer(tiny_model_dir, tmp_path, cpu_plan())
    model = trainer.model.get_base_model()
    with monkeypatch.context() as m:  # a TRL without the kernel this path calls
        m.setattr(lm_head, "_trl_kernel", lambda: False)
        assert not lm_head.select_by_position(model)
    model.config.final_logit_softcapping = 30.0
    assert not lm_head.select_by_position(model)
    model.config.final_logit_softcapping = None
    assert lm_head.select_by_position(model)
    wrapped = model.forward
    assert lm_head.select_by_position(model) and model.forward.__func__ is wrapped.__func__  # wrapped once


def test_speed_paths_train_and_evaluate_with_positions(tiny_model_dir, tmp_path, monkeypatch):
    """prepare_trainer lists the positions on the speed paths: training and evaluation run through
    them with TRL's losses and metrics (same numbers as TRL's mask on the same batches)."""
    from datasets import Dataset

    scored = []
    score = lm_head._score_positions
    monkeypatch.setattr(lm_head, "_score_positions", lambda *a: scored.append(1) or score(*a))
    logs = {}
    for name in ("trl", "ours"):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_model_dir, tmp_path / name, cpu_plan(rows=1), n_rows=24,
                               cls=fast.trainer_class(cpu_plan()), max_steps=2, logging_steps=1,
                               learning_rate=1e-3)
        if name == "ours":
            prepared = fast.prepare_trainer(trainer, cpu_plan(rows=1))
            assert prepared["lm_head"].startswith("labelled positions")
            assert isinstance(trainer.data_collator, lm_head.LabelPositions)
        trainer.train()
        metrics = trainer.evaluate(Dataset.from_dict(trainer.train_dataset[:4]))
        logs[name] = [row for row in trainer.state.log_history if "loss" in row] + [metrics]
        assert len(scored) == (0 if name == "trl" else 2 + 4)  # 2 steps, 4 rows evaluated one by one
    for ours, trl in zip(logs["ours"], logs["trl"]):
        for key in ("loss", "eval_loss", "entropy", "mean_token_accuracy", "eval_entropy"):
            if key in trl:
                assert ours[key] == pytest.approx(trl[key], rel=1e-4), key


def test_plain_path_keeps_trls_head(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, fast.SpeedPlan("plain", "reference"))
    collate = trainer.data_collator
    assert fast.prepare_trainer(trainer, fast.SpeedPlan("plain", "reference")) == {}
    assert trainer.data_collator is collate

