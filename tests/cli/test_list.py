import json

import hf_attn_plus
from hf_attn_plus.registry import COMMON_OPTIONS
from hf_attn_plus.cli import main


def test_list_shows_every_mechanism_with_options(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for m in hf_attn_plus.mechanisms():
        row = next(line for line in out.splitlines() if line.startswith(f"| {m['name']} "))
        assert m["family"] in row
        assert ("yes" if m["training_free"] else "no") in row
        common = {o.name for o in COMMON_OPTIONS}
        own = [k for k in m["options"] if k not in common]
        for option in own:
            assert f"{option}={m['options'][option]['default']}" in row
    assert "logit_scale=none" in out


def test_list_json_is_the_registry(capsys):
    main(["list", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(hf_attn_plus.mechanisms()))
