"""bench/layer.py: one attention layer, ours against its reference, times only layers that agree."""
import json

import pytest
import torch

import bench.layer as layer_bench

TINY = ["--d_model", "32", "--n_heads", "4", "--seq_lens", "8,16", "--batch_size", "2", "--n_layers", "2",
        "--warmup", "0", "--repeats", "1", "--threads", "1"]


def test_it_times_each_variant_at_each_length_against_its_reference(tmp_path, capsys):
    out = tmp_path / "layer.json"
    # baseline: the seed-style twin; diff: the transformers class its module builds
    assert layer_bench.main(["--variants", "baseline,diff", *TINY, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["seq_len"]) for r in rows] == [("baseline", 8), ("baseline", 16), ("diff", 8), ("diff", 16)]
    for r in rows:
        assert r["ours_ms"] > 0 and r["reference_ms"] > 0
        assert r["median_ratio"] == pytest.approx(r["ours_ms"] / r["reference_ms"])
    assert "diff" in capsys.readouterr().out


def test_a_reference_that_computes_something_else_is_refused_not_timed(monkeypatch, capsys):
    real = layer_bench.reference_attention

    def planted_bug(cfg, layer):  # the reference with one weight 1% off once ours are loaded
        reference = real(cfg, layer)
        original = reference.load_state_dict

        def load_and_perturb(state, strict=True):
            result = original(state, strict=strict)
            with torch.no_grad():
                dict(reference.named_parameters())["o_proj.weight"].mul_(1.01)  # output 1% off
            return result
        reference.load_state_dict = load_and_perturb
        return reference

    monkeypatch.setattr(layer_bench, "reference_attention", planted_bug)
    assert layer_bench.main(["--variants", "baseline", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: baseline: ours and its reference disagree") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--variants", "nosuch"], "--variants: unknown nosuch"),
    (["--seq_lens", "8,x"], "--seq_lens: '8,x' is not"),
    (["--layer", "8"], "--layer=8: must be in 0..7"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        layer_bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
