"""The report with bench.decode's file (--decode): which speed each variant gets (load -> compute),
and the cost figure's third panel and caption (render)."""
import json
import struct

import pytest

from analysis import decode, report
from analysis.runs import SourceError
from tests.test_analysis import three_seed_records, write_records


def row(variant, context, batch, tokens_per_s, mla_decode="n/a", status="ok"):
    return dict(variant=variant, context=context, batch=batch, status=status, mla_decode=mla_decode,
                decode_tokens_per_s=tokens_per_s, limit_ratio=0.5, machine="test CPU")


ROWS = [row("baseline", 512, 1, 100.0), row("baseline", 2048, 1, 80.0), row("baseline", 2048, 16, 900.0),
        row("baseline", 8192, 1, 40.0),  # only the baseline has 8192: not the default context
        row("lora_small", 512, 1, 120.0, "absorbed"), row("lora_small", 2048, 1, 110.0, "absorbed"),
        row("lora_small", 2048, 1, 70.0, "naive"), row("lora_small", 2048, 16, 1500.0, "absorbed"),
        row("rope_only", 2048, 1, 0.0, status="oom")]


def test_speeds_at_the_longest_common_context_smallest_batch_absorbed_mla():
    speeds = decode.speeds([r for r in ROWS if r["status"] == "ok"], "d.json")
    assert (speeds.context, speeds.batch) == (2048, 1)
    assert speeds.tokens_per_s == {"baseline": 80.0, "lora_small": 110.0}  # absorbed, not naive's 70
    chosen = decode.speeds(ROWS[:-1], "d.json", context=512)
    assert chosen.tokens_per_s == {"baseline": 100.0, "lora_small": 120.0}
    assert decode.speeds(ROWS[:-1], "d.json", batch=16).tokens_per_s == {"baseline": 900.0, "lora_small": 1500.0}
    with pytest.raises(SourceError, match="--decode-context 4096: not in the file at batch 1"):
        decode.speeds(ROWS[:-1], "d.json", context=4096)


def test_load_keeps_the_measured_rows_and_refuses_other_files(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert len(decode.load(path)) == len(ROWS) - 1
    path.write_text(json.dumps({"meta": {}, "results": []}))  # bench.step's layout, not bench.decode's
    with pytest.raises(SourceError, match="expected bench.decode's JSON list of rows"):
        decode.load(path)


def png_width(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_the_report_plots_loss_against_decode_speed(tmp_path, capsys):
    results = write_records(tmp_path / "results", three_seed_records())
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    assert report.main(["--results", str(results), "--out", str(tmp_path / "plain")]) == 0
    assert report.main(["--results", str(results), "--out", str(tmp_path / "with"), "--decode",
                        str(tmp_path / "d.json"), "--decode-context", "512"]) == 0
    # three panels instead of two: 22 inches wide instead of 15, at the figures' 130 dpi
    assert png_width(tmp_path / "plain" / report.COSTS_PNG) == 15 * 130
    assert png_width(tmp_path / "with" / report.COSTS_PNG) == 22 * 130
    text = (tmp_path / "with" / report.REPORT).read_text()
    assert "decode tokens/s at context 512, batch 1 (bench.decode, test CPU" in text
    assert "decode tokens/s" not in (tmp_path / "plain" / report.REPORT).read_text()
    capsys.readouterr()
    assert report.main(["--results", str(results), "--out", str(tmp_path / "bad"), "--decode",
                        str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --decode ")
    assert report.main(["--results", str(results), "--out", str(tmp_path / "bad"), "--decode-context", "5"]) == 2
