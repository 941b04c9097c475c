import json

import pytest
import torch

from hf_attn_plus import OptionError
from hf_attn_plus.cli import main
from hf_attn_plus.compare import Spec, kept_fraction, needle_batch, parse_spec
from hf_attn_plus.measure import TensorMemoryPeak
from hf_attn_plus.demo import char_tokenizer, default_text

# Small enough for seconds per run: quality at 96 tokens, speed/needle at 64 and 96.
FAST = ["--lengths", "64", "96", "--samples", "1", "--repeats", "1", "--decode-tokens", "3", "--no-progress"]
# A window covering every key is dense attention; a 4-key window is not.
COVERING, NARROW = "sliding_window:window=96,sinks=0", "sliding_window:window=4,sinks=0"


def test_parse_spec_validates_through_the_registry():
    assert parse_spec("hf_attn_plus:topk:budget=8,window=0") == Spec("topk", {"budget": 8, "window": 0})
    from hf_attn_plus.compare import _parse_value

    assert [_parse_value(v) for v in ("3", "0.5", "None", "true", "False", "log")] == [3, 0.5, None, True, False, "log"]
    assert parse_spec("topk:logit_scale=log,logit_scale_c=0.5,train_length=None").options == {
        "logit_scale": "log", "logit_scale_c": 0.5, "train_length": None
    }
    with pytest.raises(OptionError, match="'budget' got 0; allowed: an integer >= 1"):
        parse_spec("topk:budget=0")
    with pytest.raises(OptionError, match="no option 'bugdet'"):
        parse_spec("topk:bugdet=3")
    with pytest.raises(OptionError, match="unknown hf_attn_plus mechanism 'nope'"):
        parse_spec("nope")


def test_bad_mechanism_option_is_a_clean_cli_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["compare", "--mechanisms", "sliding_window:window=zero"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "option 'window' got 'zero'; allowed: an integer >= 1" in err and "Traceback" not in err


@pytest.mark.parametrize("length", [16, 50])
def test_kept_fraction_counts_the_window(length):
    window, sinks = 6, 2
    kept = sum(min(t + 1, window + min(sinks, max(t + 1 - window, 0))) for t in range(length))
    spec = Spec("sliding_window", {"window": window, "sinks": sinks})
    assert kept_fraction(spec, length) == pytest.approx(kept / (length * (length + 1) / 2))
    assert kept_fraction(Spec("dense"), length) == 1.0
    share = kept / (length * (length + 1) / 2)
    ends = Spec("sliding_window", {"window": window, "sinks": sinks, "dense_first": 1, "dense_last": 2})
    assert kept_fraction(ends, length, num_layers=6) == pytest.approx((3 + 3 * share) / 6)


def test_needle_batch_places_needle_and_answer():
    tokenizer = char_tokenizer()
    haystack = torch.tensor(tokenizer(default_text(), add_special_tokens=False)["input_ids"])
    ids, answer = needle_batch(tokenizer, haystack, 96, seed=1)
    assert ids.shape == answer.shape == (3, 96)
    for row, mask in zip(ids, answer):
        number = tokenizer.decode(row[mask]).strip()
        assert len(number) == 5 and number.isdigit()
        assert f"The secret number is {number}." in tokenizer.decode(row[~mask])


def test_tensor_memory_peak_counts_live_tensors():
    x = torch.ones(256, 256)  # created before tracking: not counted
    with TensorMemoryPeak() as tracker:
        a = x * 2
        b = a + 1  # a and b alive together: 2 * 256 KiB
        del a, b
        c = x.view(-1)  # a view allocates nothing
        c.add_(1)  # in place: nothing
    assert tracker.peak == 2 * 256 * 256 * 4
    assert tracker.current == 0


def test_compare_embedded_tiny_model_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    main(["compare", "tiny", "--mechanisms", COVERING, NARROW, "--json", str(out_json), "--plot", str(out_png), *FAST])
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    dense, covering, narrow = report["results"]
    assert [r["label"] for r in report["results"]] == ["dense", COVERING, NARROW]
    assert all(r["label"] in table for r in report["results"])
    assert covering["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert covering["agreement"] == covering["decode_agreement"] == 1.0 and max(covering["layer_error"]) < 1e-5
    assert 0.0 <= narrow["decode_agreement"] <= 1.0
    assert narrow["kept_fraction"] < 0.2 and min(narrow["layer_error"]) > 1e-3 and narrow["agreement"] < 1.0
    assert len(narrow["layer_error"]) == 2  # tiny_config: two layers
    for row in report["results"]:
        assert set(row["needle"]) == set(row["speed"]) == {"64", "96"}
        assert all(0.0 <= score <= 1.0 for score in row["needle"].values())
        assert all(v > 0 for v in row["speed"]["96"].values())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_lengths_time_only_where_asked(tmp_path, capsys):
    """Quality and needles at every length; timing only at --speed-lengths (none: no speed columns, no plot lines)."""
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    main(["compare", "tiny", "--mechanisms", NARROW, "--json", str(out_json), "--plot", str(out_png), *FAST,
          "--speed-lengths"])
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["settings"]["speed_lengths"] == []
    assert all(r["speed"] == {} and set(r["needle"]) == {"64", "96"} for r in report["results"])
    assert "needle 64/96" in table and "prefill ms" not in table
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["compare", "tiny", "--mechanisms", NARROW, "--json", str(out_json), *FAST, "--speed-lengths", "32"])
    assert "prefill ms @32" in capsys.readouterr().out
    assert all(set(r["speed"]) == {"32"} for r in json.loads(out_json.read_text())["results"])


def test_keys_kept_is_counted_on_the_models_own_selections(tmp_path):
    """A position rule keeps on the text what it keeps on random data; a mass threshold keeps what the model's
    queries and keys make it keep (all of it at threshold 1), and the row says it was measured."""
    out_json = tmp_path / "r.json"
    sparse = "block_sparse:block_size=8,threshold=0.3,sink_blocks=0"
    main(["compare", "tiny", "--mechanisms", NARROW, "block_sparse:block_size=8,threshold=1.0", sparse,
          "--json", str(out_json), *FAST])
    _, narrow, whole, thresholded = json.loads(out_json.read_text())["results"]
    assert narrow["kept_measured"] and whole["kept_measured"] and thresholded["kept_measured"]
    assert narrow["kept_fraction"] == pytest.approx(kept_fraction(parse_spec(NARROW), 96))
    assert whole["kept_fraction"] == 1.0
    assert 0.0 < thresholded["kept_fraction"] < 1.0


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_compare_local_model_dir(model_type, tiny_dir, tmp_path):
    path, _ = tiny_dir(model_type)
    out_json = tmp_path / "r.json"
    main(["compare", str(path), "--mechanisms", COVERING, NARROW, "--json", str(out_json), *FAST])
    dense, covering, narrow = json.loads(out_json.read_text())["results"]
    assert covering["agreement"] == covering["decode_agreement"] == 1.0 and max(covering["layer_error"]) < 1e-5
    assert min(narrow["layer_error"]) > 1e-3


def test_compare_includes_a_converted_models_own_mechanism(tiny_dir, tmp_path):
    from hf_attn_plus.compare import default_specs
    from hf_attn_plus.demo import load_subject

    path, _ = tiny_dir("llama", "topk", budget=3, window=2)
    specs = default_specs(load_subject(str(path)).model)
    assert specs[:2] == [Spec("dense"), Spec("topk", {"budget": 3, "window": 2})]


def test_text_too_short_is_a_clean_error(tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text("x = 1\n")
    with pytest.raises(SystemExit):
        main(["compare", "tiny", "--data", str(data), "--mechanisms", NARROW, *FAST])
    assert "pass a longer --data file" in capsys.readouterr().err
