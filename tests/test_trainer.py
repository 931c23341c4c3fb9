"""HuggingFace Trainer with Highway-BP through hbp_compile.trainer: the rewrite happens (report),
Trainer keeps the model's columns, and at k >= L one Trainer SGD step equals the same step on an
uncompiled copy (exact autograd, float64); at k = 1 it differs."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hbp_compile.trainer import HBPCallback, compile_for_trainer  # noqa: E402

N_LAYER, V, S, N = 2, 32, 8, 4
L = 2 * N_LAYER                          # attention and MLP steps per layer


class Rows(torch.utils.data.Dataset):
    """Dict rows, with a column the model does not take (Trainer must drop only that one)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "note": torch.tensor(i)}


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=N_LAYER, n_embd=32, n_head=2, vocab_size=V,
                                  n_positions=S, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, use_cache=False, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().train()


def _trainer(model, backend, tmp_path, ids, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=N, max_steps=1,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    args.update(overrides)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**args),
                                train_dataset=Rows(ids),
                                callbacks=[HBPCallback(backend)] if backend else [])


def _max_diff(a, b):
    return max((p - q).abs().max().item() / max(q.abs().max().item(), 1e-12)
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("k, exact", [(L, True), (1, False)])
def test_trainer_trains_with_highway_bp(tmp_path, k, exact):
    ids = torch.randint(0, V, (N, S))
    model = _model()
    reference = copy.deepcopy(model)
    backend = compile_for_trainer(model, iters=k, codegen="eager")
    trainer = _trainer(model, backend, tmp_path, ids)
    trainer.train()
    # the forward signature Trainer read is GPT2's, so its columns were kept
    assert {"input_ids", "labels"} <= set(trainer._signature_columns)
    assert "note" not in trainer._signature_columns
    # (the loss's one-time logging may break the graph after the stream: a second graph)
    assert [s.length for r in backend.reports for s in r.streams] == [L]
    assert sum(r.rewritten_blocks for r in backend.reports) == L
    # the reference: the same Trainer step on an uncompiled copy (exact autograd)
    _trainer(reference, None, tmp_path, ids).train()
    diff = _max_diff(model, reference)
    assert (diff < 1e-10) if exact else (diff > 1e-8)


def test_misuse_is_refused(tmp_path):
    model = _model()
    with pytest.raises(TypeError, match="uncompiled model"):
        compile_for_trainer(torch.compile(model), iters=1)
    backend = compile_for_trainer(model, iters=1, codegen="eager")
    with pytest.raises(ValueError, match="already compiled"):
        compile_for_trainer(model, iters=1)
    trainer = _trainer(model, backend, tmp_path, torch.randint(0, V, (N, S)),
                       torch_compile=True, torch_compile_backend="inductor")
    with pytest.raises(ValueError, match="torch_compile=False"):
        trainer.train()
