"""Section 3 of issue 18: what the language models learned. The n-gram baselines of the validation
tokens (data.ngram_losses, by hand), the context gain from per-position losses (against materialised
logits), and the report's regime statement both ways."""
import math

import numpy as np
import pytest
import torch

import record
from data import IGNORE_INDEX, cached_ngram_losses, ngram_losses


def test_ngram_losses_by_hand():
    # Training block 0 1 0 1: pairs (0,1) (1,0) (0,1), targets 1 0 1. V = 3.
    # unigram, add-one: c = (1, 2, 0), N = 3 -> P = (2/6, 3/6, 1/6)
    # bigram, Witten-Bell: c(0,1) = 2, c(1,0) = 1; c(0) = 2, c(1) = 1; T(0) = T(1) = 1, c(2) = 0
    #   1 after 0: (2 + 1 * 1/2) / (2 + 1) = 5/6;  1 after 1: (0 + 1 * 1/2) / (1 + 1) = 1/4
    #   0 after 2: never a previous token -> P(0) = 1/3
    train = np.array([[0, 1, 0, 1]])
    inputs, targets = np.array([[0, 1, 2, 2]]), np.array([[1, 1, 0, IGNORE_INDEX]])
    losses = ngram_losses(train, inputs, targets, vocab_size=3)
    assert losses[record.DATA_UNIGRAM_LOSS] == pytest.approx(-(math.log(1 / 2) * 2 + math.log(1 / 3)) / 3)
    assert losses[record.DATA_BIGRAM_LOSS] == pytest.approx(-(math.log(5 / 6) + math.log(1 / 4) + math.log(1 / 3)) / 3)


def test_ngram_probabilities_sum_to_one():
    """Both smoothed models are distributions over the vocabulary, for every previous token."""
    rng = np.random.default_rng(0)
    vocab = 7
    train = rng.integers(0, vocab - 1, size=(5, 9))  # token 6 never appears: smoothing must cover it
    for previous in range(vocab):
        unigram = bigram = 0.0
        for token in range(vocab):
            losses = ngram_losses(train, np.array([[previous]]), np.array([[token]]), vocab)
            unigram += math.exp(-losses[record.DATA_UNIGRAM_LOSS])
            bigram += math.exp(-losses[record.DATA_BIGRAM_LOSS])
        assert unigram == pytest.approx(1.0) and bigram == pytest.approx(1.0)


def test_ngram_cache_beside_the_token_cache(tmp_path):
    """Computed once: a second call reads the file beside the token cache (keyed by the split's
    tokens), and another split gets its own file."""
    from config import TrainConfig
    from data import token_cache_paths

    cfg = TrainConfig(cache_dir=str(tmp_path))
    train = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 2]])
    val = [(torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]]))]
    first = cached_ngram_losses(cfg, train.numpy(), val, 3)
    tokens, _ = token_cache_paths(cfg)
    (cached,) = tmp_path.glob(f"{tokens.stem}.ngram-*.json")
    assert first == ngram_losses(train.numpy(), val[0][0].numpy(), val[0][1].numpy(), 3)
    cached.write_text('{"data/unigram_loss": 1.5, "data/bigram_loss": 0.5}')  # the file is what is read
    assert cached_ngram_losses(cfg, train.numpy(), val, 3) == {record.DATA_UNIGRAM_LOSS: 1.5, record.DATA_BIGRAM_LOSS: 0.5}
    cached_ngram_losses(cfg, train[:1].numpy(), val, 3)
    assert len(list(tmp_path.glob(f"{tokens.stem}.ngram-*.json"))) == 2


# --- per-position losses and the context gain ----------------------------------------------------

def _tiny_model(seq_len=32, vocab=97):
    from attention import VARIANTS
    from model import ModelConfig, MoELM, init_weights

    model = MoELM(ModelConfig(attention=VARIANTS["baseline"], vocab_size=vocab, d_model=32, n_layers=1, n_heads=2,
                              d_ff=32, n_experts=2, top_k=1, seq_len=seq_len, dropout=0.0))
    init_weights(model, seed=1)
    return model.eval()


def test_token_losses_are_the_materialised_cross_entropy(monkeypatch):
    """model(ids, targets).token_losses: each target's cross-entropy on model(ids)'s logits (chunked
    here, 7 tokens a chunk), 0 where the target is IGNORE_INDEX."""
    import torch.nn.functional as F

    import model as model_module

    monkeypatch.setattr(model_module, "LM_HEAD_CHUNK_ELEMENTS", 7 * 97)
    model = _tiny_model()
    ids = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(2))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, ::3] = IGNORE_INDEX
    with torch.no_grad():
        expected = F.cross_entropy(model(inputs).logits.transpose(1, 2), targets, reduction="none")
        out = model(inputs, targets)
    assert out.token_losses.shape == (3, 32)
    torch.testing.assert_close(out.token_losses, expected, rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(expected.sum().item() / (targets != IGNORE_INDEX).sum().item(), rel=1e-5)


def test_context_windows_and_gain_by_hand():
    from train import context_gain, context_windows

    assert context_windows(32) == (range(4, 8), range(28, 32))
    assert context_windows(512) == (range(64, 128), range(448, 512))  # Olsson et al.: the 50th vs 500th of 512
    losses = [5.0] * 4 + [4.0, 4.0, 6.0, 6.0] + [3.0] * 20 + [1.0, 2.0, 2.0, 3.0]
    assert context_gain(losses) == pytest.approx(5.0 - 2.0)
    assert context_gain([1.0, 2.0, 3.0]) is None  # a window with no position


class _FixedBatches:
    """Validation batches and examples at other lengths, fixed tensors (what data.Batches provides)."""

    def __init__(self, pairs, long_pairs):
        self.pairs, self.long_pairs = pairs, long_pairs

    def val_batch(self, index):
        return self.pairs[index]

    def at_length(self, length, index):
        return self.long_pairs[length][index]


def test_evaluate_context_gain_and_lengths_match_materialised_logits(tmp_path):
    """train.Run.evaluate's val/context_gain and evaluate_at_lengths' val_len{L}/*, over two
    batches, against cross-entropy on the materialised logits, windows by hand (seq_len 32: early
    positions 4-7, late 28-31)."""
    import torch.nn.functional as F

    from config import config_from_values
    from train import Run

    cfg = config_from_values({"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32, "batch_size": 3,
                              "eval_batches": 2, "eval_lengths": "80", "results_dir": str(tmp_path)})
    model = _tiny_model()
    gen = torch.Generator().manual_seed(5)
    blocks = [torch.randint(0, 97, (3, 33), generator=gen) for _ in range(2)]
    long = [torch.randint(0, 97, (3, 81), generator=gen) for _ in range(2)]
    batches = _FixedBatches([(b[:, :-1], b[:, 1:]) for b in blocks], {80: [(b[:, :-1], b[:, 1:]) for b in long]})
    run = Run(cfg)
    results = run.evaluate(model, batches, 1, 0, torch.device("cpu"))
    lengths = run.evaluate_at_lengths(model, batches, 1, 0, torch.device("cpu"))

    with torch.no_grad():
        losses = torch.cat([F.cross_entropy(model(b[:, :-1]).logits.transpose(1, 2), b[:, 1:], reduction="none")
                            for b in blocks])
        long_logits = torch.cat([model(b[:, :-1]).logits for b in long])
    long_targets = torch.cat([b[:, 1:] for b in long])
    assert results[record.VAL_LOSS] == pytest.approx(losses.mean().item(), rel=1e-5)
    expected_gain = losses[:, 4:8].mean() - losses[:, 28:32].mean()
    assert results[record.VAL_CONTEXT_GAIN] == pytest.approx(expected_gain.item(), rel=1e-4, abs=1e-6)
    long_ce = F.cross_entropy(long_logits.transpose(1, 2), long_targets)
    assert lengths == pytest.approx({"val_len80/loss": long_ce.item(),
                                     "val_len80/accuracy": (long_logits.argmax(-1) == long_targets).float().mean().item()},
                                    rel=1e-5)


def test_a_run_records_the_baselines_context_gain_and_lengths(tmp_path):
    """One tiny lm run with --eval_lengths: the record's and the W&B run's summary carry the n-gram
    baselines (equal to ngram_losses over the run's own split), val/context_gain and val_len{L}/*,
    and the final history row has them too; the n-gram cache sits beside the token cache."""
    from config import config_from_values
    from data import load_tokens, make_batches, token_cache_paths
    from train_helpers import offline_run_when_ended, read_record, run_train, small_corpus, tiny_args

    args = tiny_args(tmp_path, small_corpus(tmp_path), eval_lengths="64,100")
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_record(tmp_path / "results", "local", "baseline-s0")["summary"]
    final = read_record(tmp_path / "results", "local", "baseline-s0")["history"][-1]
    keys = [record.DATA_UNIGRAM_LOSS, record.DATA_BIGRAM_LOSS, record.VAL_CONTEXT_GAIN,
            *record.length_keys(64), *record.length_keys(100)]
    assert all(math.isfinite(summary[k]) for k in keys)
    assert all(final[k] == summary[k] for k in keys[2:])

    cfg = config_from_values(dict(arg[2:].split("=", 1) for arg in args))
    tokens, vocab = load_tokens(cfg)
    batches = make_batches(tokens, cfg)
    val = [batches.val_batch(i) for i in range(cfg.eval_batches)]
    expected = ngram_losses(batches.blocks[batches.train_ids].numpy(), torch.cat([v[0] for v in val]).numpy(),
                            torch.cat([v[1] for v in val]).numpy(), vocab)
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert summary[record.DATA_BIGRAM_LOSS] < summary[record.DATA_UNIGRAM_LOSS]  # the previous token helps
    stem = token_cache_paths(cfg)[0].stem
    assert len(list((tmp_path / "cache").glob(f"{stem}.ngram-*.json"))) == 1

    (run_dir,) = (tmp_path / "results" / "wandb").glob("offline-run-*")
    wandb_summary = offline_run_when_ended(run_dir)["summary"]
    assert {k: wandb_summary[k] for k in keys} == pytest.approx({k: summary[k] for k in keys})
