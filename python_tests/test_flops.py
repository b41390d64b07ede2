"""Tests for rmt_fast.experiments.flops (Fig. 3 of arXiv:2304.11062)."""


import pytest

import rmt_fast.experiments.flops as flops
from rmt_fast.experiments.flops import (
    FIG3_TARGETS,
    FIG3_TOKENS,
    OPT_CONFIGS,
    OPTConfig,
    fig3_table,
    format_table,
    forward_flops,
    plot_speedup,
    rmt_forward_flops,
    speedup,
)

CELLS = [(m, n, t) for m, row in FIG3_TARGETS.items() for n, t in row.items()]


def test_targets_cover_15_cells():
    assert len(CELLS) == 15
    assert set(FIG3_TARGETS) == set(OPT_CONFIGS)
    assert {8192, 64000, 2048000} <= set(FIG3_TOKENS)


@pytest.mark.parametrize("model,tokens,target", CELLS)
def test_paper_accounting_reproduces_fig3(model, tokens, target):
    assert speedup(model, tokens) == pytest.approx(target, rel=0.01)


def test_paper_worst_cell_error():
    worst = max(abs(speedup(m, n) / t - 1) for m, n, t in CELLS)
    assert worst < 0.005  # documented: 0.44 % (opt-175b at 8,192)


def test_chinchilla_accounting_125m_2m_tokens():
    value = speedup("opt-125m", 2_048_000, accounting="chinchilla")
    # closed form: (x + N) / (x + 512) with x = A / B
    cfg = OPT_CONFIGS["opt-125m"]
    d, h, f, V, n = cfg.d_model, cfg.heads, cfg.ffn, cfg.vocab, cfg.layers
    A = 4 * V * d + n * (8 * d * d + 4 * d * f)
    B = n * (4 * d + 3 * h)
    assert value == pytest.approx((A / B + 2_048_000) / (A / B + 512), rel=1e-12)
    assert value == pytest.approx(223.37, abs=0.01)
    assert 220 < value < 226  # documented ~223x, not the figure's 295.2x


def test_chinchilla_does_not_reproduce_figure():
    worst = max(abs(speedup(m, n, accounting="chinchilla") / t - 1) for m, n, t in CELLS)
    assert worst > 0.05


def test_forward_flops_chinchilla_terms():
    cfg = OPT_CONFIGS["opt-125m"]
    L, d, h, f, V, n = 512, cfg.d_model, cfg.heads, cfg.ffn, cfg.vocab, cfg.layers
    expected = (
        2 * L * V * d
        + n * (6 * L * d * d + 2 * L * L * d + 3 * h * L * L + 2 * L * L * d + 2 * L * d * d + 4 * L * d * f)
        + 2 * L * d * V
    )
    assert forward_flops("opt-125m", L, accounting="chinchilla") == pytest.approx(expected, rel=1e-12)
    paper = expected - 2 * L * V * d + n * 7 * h * L * L
    assert forward_flops("opt-125m", L) == pytest.approx(paper, rel=1e-12)


def test_single_segment_ratio_is_one():
    for m in OPT_CONFIGS:
        assert speedup(m, 512) == pytest.approx(1.0)


def test_memory_tokens_lower_ratio_and_are_excluded_by_default():
    base = speedup("opt-125m", 64000)
    assert speedup("opt-125m", 64000, num_mem_tokens=0) == base
    with_mem = speedup("opt-125m", 64000, num_mem_tokens=10)
    assert with_mem < base
    rmt = rmt_forward_flops("opt-125m", 64000, num_mem_tokens=10)
    assert rmt == pytest.approx(125 * forward_flops("opt-125m", 512 + 2 * 10))


def test_segment_counting():
    # 1000 tokens = 1.953 segments fractional, 2 segments rounded up
    frac = rmt_forward_flops("opt-125m", 1000)
    ceil = rmt_forward_flops("opt-125m", 1000, fractional_segments=False)
    assert frac == pytest.approx(1000 / 512 * forward_flops("opt-125m", 512))
    assert ceil == pytest.approx(2 * forward_flops("opt-125m", 512))


def test_model_as_config_and_dict():
    cfg = OPT_CONFIGS["opt-1.3b"]
    as_dict = {"layers": 24, "d_model": 2048, "heads": 32, "ffn": 8192, "vocab": 50272}
    hf_dict = {"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 32,
               "ffn_dim": 8192, "vocab_size": 50272}
    ref = speedup("opt-1.3b", 64000)
    assert speedup(cfg, 64000) == ref
    assert speedup(as_dict, 64000) == pytest.approx(ref)
    assert speedup(hf_dict, 64000) == pytest.approx(ref)
    assert speedup(OPTConfig(24, 2048, 32, 8192), 64000) == pytest.approx(ref)
    assert speedup("facebook/OPT-1.3B", 64000) == pytest.approx(ref)


def test_fig3_table_and_format():
    rows = fig3_table()
    assert [r["tokens"] for r in rows] == list(FIG3_TOKENS)
    for r in rows:
        assert set(r) == {"tokens", *OPT_CONFIGS}
    by_tokens = {r["tokens"]: r for r in rows}
    for m, n, t in CELLS:
        assert by_tokens[n][m] == pytest.approx(t, rel=0.01)
    text = format_table()
    assert "opt-175b" in text and "2,048,000" in text and "295.07" in text
    assert len(text.splitlines()) == len(FIG3_TOKENS) + 2
    chin = format_table(accounting="chinchilla")
    assert "223.37" in chin


@pytest.mark.parametrize(
    "kwargs,argname",
    [
        (dict(model="opt-13b", num_tokens=1024), "model"),
        (dict(model="opt-125m", num_tokens=0), "num_tokens"),
        (dict(model="opt-125m", num_tokens=-5), "num_tokens"),
        (dict(model="opt-125m", num_tokens=1024, segment_size=0), "segment_size"),
        (dict(model="opt-125m", num_tokens=1024, segment_size=-512), "segment_size"),
        (dict(model="opt-125m", num_tokens=1024, accounting="kaplan"), "accounting"),
        (dict(model="opt-125m", num_tokens=1024, num_mem_tokens=-1), "num_mem_tokens"),
        (dict(model={"layers": 2}, num_tokens=1024), "model"),
    ],
)
def test_bad_input(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        speedup(**kwargs)


def test_unknown_model_lists_allowed_names():
    with pytest.raises(ValueError) as exc:
        forward_flops("gpt2", 512)
    for name in OPT_CONFIGS:
        assert name in str(exc.value)


def test_bad_accounting_in_table_and_flops():
    with pytest.raises(ValueError, match="accounting"):
        forward_flops("opt-125m", 512, accounting="Paperz")
    with pytest.raises(ValueError, match="accounting"):
        fig3_table(accounting="x")
    with pytest.raises(ValueError, match="num_tokens"):
        forward_flops("opt-125m", float("nan"))


def test_import_is_light():
    # the counting needs neither torch nor matplotlib (the figure is drawn by experiments.plots, lazily)
    src = open(flops.__file__).read()
    assert "import torch" not in src and "import matplotlib" not in src


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig3.png"
    ret = plot_speedup(out)
    assert ret == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    out2 = tmp_path / "fig3_chinchilla.png"
    plot_speedup(str(out2), accounting="chinchilla")
    assert out2.read_bytes()[:4] == b"\x89PNG"
