"""Section 2 of issue 18: models evaluated past the context they were built for (seq_len).

- every position signal and window, whole model: evaluated at 4 x seq_len, a model equals the same
  model whose RoPE tables were built directly at that length (attention/rope.py's rope_tables), and
  its first seq_len positions equal the model evaluated at seq_len;
- a windowed model (RoPE or ALiBi) is relative: past seq_len each output equals the same model run
  on only the last tokens its layers reach, a sequence shorter than seq_len;
- the attention modules built for a short context (max_len 8) against transformers' references at
  lengths past it (Llama with and without linear scaling, Mistral's window, DeepSeek-V3's MLA).
"""
import copy

import pytest
import torch

from attention import VARIANTS
from attention.rope import RotaryEmbedding, rope_tables
from model import ModelConfig, MoELM, init_weights

SEQ_LEN, VOCAB = 16, 61
LONG = 4 * SEQ_LEN

CASES = {
    "baseline": VARIANTS["baseline"],  # RoPE
    "baseline+linear2": VARIANTS["baseline"].with_overrides(rope_scaling="linear", rope_scaling_factor=2.0),
    "alibi": VARIANTS["alibi"],
    "nope": VARIANTS["nope"],
    "swa": VARIANTS["swa"],  # a window of seq_len / 4 on every layer
    "local_global": VARIANTS["local_global"],
    "lora_small": VARIANTS["lora_small"],  # MLA, decoupled RoPE key
    "rope_small": VARIANTS["rope_small"],  # MLA with linear scaling 1.5
}


def tiny_model(spec, n_layers=2) -> MoELM:
    cfg = ModelConfig(attention=spec, vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=2, d_ff=32,
                      n_experts=2, top_k=1, seq_len=SEQ_LEN, dropout=0.0)
    model = MoELM(cfg)
    init_weights(model, seed=3)
    with torch.no_grad():  # attention outputs far from their small init, so positions matter in the logits
        for name, param in model.named_parameters():
            if name.endswith("o_proj.weight"):
                param.mul_(20)
    return model.eval()


def ids(length, batch=2, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_past_seq_len_equals_tables_built_at_that_length(name):
    model = tiny_model(CASES[name])
    direct = copy.deepcopy(model)
    rotaries = [m for m in direct.modules() if isinstance(m, RotaryEmbedding)]
    assert bool(rotaries) == (name not in ("alibi", "nope"))
    for rotary in rotaries:
        assert rotary.cos.shape[0] == SEQ_LEN  # built for the training context
        rotary.cos, rotary.sin = rope_tables(rotary.dim, rotary.theta, rotary.scaling, rotary.factor, LONG)
    x = ids(LONG)
    with torch.no_grad():
        long, reference = model(x).logits, direct(x).logits
        short = model(x[:, :SEQ_LEN]).logits  # after the long call: the rebuilt tables sliced back
    torch.testing.assert_close(long, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long[:, :SEQ_LEN], short, rtol=1e-5, atol=1e-5)
    # the window stays what the model was trained with (a quarter of seq_len), not of the longer call
    windows = {layer.self_attn.window for layer in model.layers if hasattr(layer.self_attn, "window")}
    assert windows == {"swa": {SEQ_LEN // 4}, "local_global": {SEQ_LEN // 4, 0}}.get(name, windows)


def test_past_seq_len_check_sees_a_wrong_table():
    """Negative control: tables built at the long length but with another scaling factor differ."""
    model = tiny_model(CASES["baseline+linear2"])
    wrong = copy.deepcopy(model)
    for rotary in (m for m in wrong.modules() if isinstance(m, RotaryEmbedding)):
        rotary.cos, rotary.sin = rope_tables(rotary.dim, rotary.theta, "linear", 1.0, LONG)
    x = ids(LONG)
    with torch.no_grad():
        assert (model(x).logits - wrong(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("spec", [VARIANTS["swa"], VARIANTS["alibi"].with_overrides(window=4)], ids=["swa", "alibi+window4"])
def test_windowed_model_is_relative_past_seq_len(spec):
    """With every layer windowed (window W), an output sees only the last n_layers x (W - 1) tokens,
    and RoPE and ALiBi see only their distances: at any position t past seq_len, the output equals
    that of the same model on tokens t - reach .. t alone, a sequence inside the trained length."""
    model = tiny_model(spec)
    window = model.layers[0].self_attn.window
    reach = len(model.layers) * (window - 1)
    assert window == 4 and reach + 1 < SEQ_LEN
    x = ids(LONG, seed=1)
    with torch.no_grad():
        long = model(x).logits
        for t in (SEQ_LEN, 2 * SEQ_LEN + 5, LONG - 1):
            alone = model(x[:, t - reach:t + 1]).logits[:, -1]
            torch.testing.assert_close(long[:, t], alone, rtol=1e-4, atol=1e-4)
        # negative control: one token fewer of context changes the answer, so the reach is exact
        assert (long[:, LONG - 1] - model(x[:, LONG - reach:]).logits[:, -1]).abs().max() > 1e-4


# --- modules built for 8 positions, against the references at 17 and 32 ------------------------

def _built_for_8(spec, seed):
    from attention import build_attention
    from test_attention import D_MODEL, N_HEADS, THETA, randomize_

    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA, max_len=8).eval()
    randomize_(ours, seed)
    return ours


def _check_past_8(ours, ref, rotary):
    """The references' shapes (lengths 1, 17, 32: the tables rebuilt twice), then 17 again from the
    32-long table; outputs within the references' tolerance."""
    from test_attention import TOL, assert_equivalent, rel_err, run_both

    assert ours.rotary.cos.shape[0] == 8
    assert_equivalent(ours, ref, rotary, seed=71)
    y, y_ref, *_ = run_both(ours, ref, rotary, 2, 17, seed=73)
    assert ours.rotary.cos.shape[0] == 32 and rel_err(y, y_ref) < TOL


@pytest.mark.parametrize("spec", [VARIANTS["baseline"], VARIANTS["baseline"].with_overrides(rope_scaling_factor=2.5)],
                         ids=["rope", "rope+linear2.5"])
def test_rope_past_max_len_matches_llama(spec):
    from test_attention import llama_reference

    ours = _built_for_8(spec, seed=5)
    ref, rotary = llama_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    _check_past_8(ours, ref, rotary)


def test_window_past_max_len_matches_mistral():
    from test_attention_zoo_windows import mistral_reference

    spec = VARIANTS["baseline"].with_overrides(window=5, rope_scaling_factor=2.0)
    ours = _built_for_8(spec, seed=41)
    ref, rotary = mistral_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    _check_past_8(ours, ref, rotary)


@pytest.mark.parametrize("name", ["lora_small", "rope_small"])
def test_mla_past_max_len_matches_deepseek_v3(name):
    from test_attention import D_MODEL, N_HEADS, deepseek_reference

    spec = VARIANTS[name].resolved(D_MODEL, N_HEADS)
    ours = _built_for_8(spec, seed=17)
    ref, rotary = deepseek_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    _check_past_8(ours, ref, rotary)


# --- lm: validation examples at other lengths (data.Batches.at_length) ---------------------------

def _arange_batches(**overrides):
    """Batches over the stream 0, 1, 2, ..: every token names its own position, so a token's
    presence says exactly which block it came from."""
    import numpy as np

    from config import TrainConfig
    from data import make_batches

    cfg = TrainConfig(**{"seq_len": 7, "batch_size": 2, "eval_batches": 2, "val_fraction": 0.1, "test_fraction": 0.1,
                         **overrides})
    return make_batches(np.arange(4000, dtype=np.int64), cfg)


def test_at_length_by_hand_and_disjoint_from_training():
    batches = _arange_batches()
    block = 8  # seq_len + 1
    val = batches.val_ids
    # length 20 needs 21 tokens: three validation blocks (24 tokens) end to end, cut to 21
    inputs, targets = batches.at_length(20, 1)
    assert inputs.shape == targets.shape == (2, 20)
    for row, example in enumerate((2, 3)):  # batch 1 holds examples 2 and 3
        expected = torch.cat([torch.arange(b * block, (b + 1) * block) for b in val[3 * example:3 * example + 3]])[:21]
        assert torch.equal(inputs[row], expected[:-1]) and torch.equal(targets[row], expected[1:])
    # no token of any training (or test) block, at any length
    training = set(batches.blocks[batches.train_ids].flatten().tolist())
    test = set(batches.blocks[batches.test_ids].flatten().tolist())
    for length in (7, 8, 20, 31):
        for index in range(2):
            seen = set(torch.cat(batches.at_length(length, index), 1).flatten().tolist())
            assert not seen & training and not seen & test


def test_at_seq_len_is_the_validation_batch():
    batches = _arange_batches()
    inputs, targets = batches.at_length(7, 1)
    block = batches.blocks[batches.val_ids[2:4]]  # validation batch 1: blocks 2 and 3
    assert torch.equal(inputs, block[:, :-1]) and torch.equal(targets, block[:, 1:])


def test_at_length_too_long_for_the_validation_set_is_one_line():
    from config import ConfigError

    batches = _arange_batches()  # 50 validation blocks of 8 tokens
    with pytest.raises(ConfigError, match=r"--eval_lengths=200: the 50 validation blocks make 1 examples"):
        batches.at_length(200, 0)


@pytest.mark.parametrize("value", ["0", "abc", "128,-1", "128,,256", "1.5"])
def test_bad_eval_lengths_is_one_error_line(value, capsys):
    import train

    assert train.main([f"--eval_lengths={value}", "--dry_run", "--vocab_size=100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --eval_lengths={value}: expected context lengths, integers greater than 0 separated by "
                   f"commas, e.g. 128,256")


def test_eval_lengths_parse_sorted_once():
    from config import config_from_values

    assert config_from_values({"eval_lengths": "256, 128,256"}).lengths == (128, 256)
    assert config_from_values({"eval_lengths": 96}).lengths == (96,)  # a sweep's single integer value
    assert config_from_values({}).lengths == ()


def test_a_length_the_validation_set_cannot_fill_is_refused_before_training(tmp_path):
    from train_helpers import read_record, run_train, small_corpus, tiny_args

    result = run_train(tiny_args(tmp_path, small_corpus(tmp_path), eval_lengths="32,100000"),
                       env={"WANDB_MODE": "disabled"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--eval_lengths=100000: the " in errors[0] and "Traceback" not in result.stderr
    saved = read_record(tmp_path / "results", "local", "baseline-s0")
    assert saved["status"] == "failed" and saved["history"] == []  # not one step trained
