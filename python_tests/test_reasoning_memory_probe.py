"""scripts/reasoning_memory_probe.py: linear probes of what a reasoning RMT's memory holds about the facts."""
import json

import pytest
import torch

from rmt_fast.experiments.trainer import train

import bench_scripts
from test_train import tiny


def _module():
    return bench_scripts.load_script("reasoning_memory_probe")


def test_targets_are_relative_to_the_hub_whatever_the_fact_order():
    from rmt_fast.experiments.tasks.facts import PLACES

    mod = _module()
    facts = ["The kitchen is north of the garden.", "The garden is east of the office."]
    t = mod.targets(facts)
    assert t == mod.targets(facts[::-1])
    assert t["hub"] == PLACES.index("garden")
    assert t["north of hub"] == PLACES.index("kitchen")
    assert t["west of hub"] == PLACES.index("office")  # "garden east of office": the office lies west of it
    assert t["south of hub"] == t["east of hub"] == len(PLACES)  # nothing there
    assert [p for p in PLACES if t[f"place:{p}"]] == ["garden", "kitchen", "office"]
    assert all(0 <= v < mod.num_classes(k) for k, v in t.items())
    assert (mod.num_classes("place:garden"), mod.num_classes("hub"), mod.num_classes("west of hub")) == (2, 6, 7)


def test_probe_reads_a_linear_code_and_not_noise():
    mod = _module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, 3] > 0).long() + 2 * (x[:, 7] > 0).long()  # 4 classes, linear in two features
    r = mod.fit_probe(x[:400], y[:400], x[400:], y[400:], classes=4)
    assert r["test_accuracy"] > 0.9 and r["chance"] < 0.4
    noise = torch.randint(0, 4, (600,), generator=g)
    r = mod.fit_probe(x[:400], noise[:400], x[400:], noise[400:], classes=4)
    assert r["test_accuracy"] < 0.45


def test_probe_of_a_saved_run(tmp_path, capsys):
    mod = _module()
    train(tiny(tmp_path / "run", task="reasoning", segment_size=32, schedule=[1], max_steps_per_stage=1,
               eval_every=1))
    out = tmp_path / "p.json"
    assert mod.main(["--model", str(tmp_path / "run" / "checkpoint-last"), "--segments", "2", "--train", "24",
                     "--test", "8", "--batch-size", "16", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.load(open(out))
    assert set(doc["probes"]) == {*(f"place:{p}" for p in ("bathroom", "bedroom", "garden", "hallway", "kitchen",
                                                            "office")),
                                  "hub", "north of hub", "south of hub", "east of hub", "west of hub"}
    for row in doc["probes"].values():
        for f in ("memory", "tokens"):
            assert 0 <= row[f]["test_accuracy"] <= 1 and 0 < row[f]["chance"] <= 1
    assert "north of hub" in capsys.readouterr().out
    memorize = tmp_path / "mem"
    train(tiny(memorize, schedule=[1], max_steps_per_stage=1, eval_every=1))
    assert mod.main(["--model", str(memorize / "checkpoint-last"), "--out", str(tmp_path / "x.json")]) == 2
    assert "reasoning" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--segments", "1"], ["--train", "3"], ["--test", "0"]])
def test_bad_arguments_name_the_option(bad, capsys):
    with pytest.raises(SystemExit):
        _module().parse_args(["--model", "m", "--out", "o", *bad])
    assert bad[0] in capsys.readouterr().err


def test_direction_layer_probe(tmp_path):
    """scripts/direction_layer_probe.py: the place token it probes is the place, a decoder's place token has not
    seen the direction (its state does not change with it), and the JSON has a row per layer."""
    import json

    import torch

    mod = bench_scripts.load_script("direction_layer_probe")
    model, tok, kind = mod.load("tiny-gpt2", 0)
    fact = "The kitchen is north of the garden."
    ids = tok(fact, add_special_tokens=False)["input_ids"]
    k = mod.place_token(tok, ids, "kitchen")
    assert tok.decode(ids[k:k + 1]).strip() == "kitchen"
    with pytest.raises(ValueError, match="office"):
        mod.place_token(tok, ids, "office")
    # causal: the state at the place is the same whatever direction follows
    other = tok("The kitchen is south of the garden.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        h1 = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, k]
        h2 = model(input_ids=torch.tensor([other]), output_hidden_states=True).hidden_states[-1][0, k]
    torch.testing.assert_close(h1, h2)
    out = tmp_path / "probe.json"
    assert mod.main(["--backbones", "tiny-bert,tiny-gpt2", "--samples", "24", "--batch-size", "10",
                     "--segment-size", "40", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    for name in ("tiny-bert", "tiny-gpt2"):
        rows = doc["backbones"][name]["layers"]
        assert [r["layer"] for r in rows] == [0, 1, 2]  # embeddings + the tiny models' two layers
        assert all(0 <= r[w]["test_accuracy"] <= 1 for r in rows for w in ("leaf", "end", "end_pair"))
        assert doc["backbones"][name]["facts_fitted"] + doc["backbones"][name]["facts_scored"] == 48
    assert (tmp_path / "probe.png").read_bytes()[:4] == b"\x89PNG"
