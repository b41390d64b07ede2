"""benchmarks/attention.py's argument handling (no GPU needed: the script imports torch only when it runs)."""
import pytest

import bench_scripts


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("attention")


def test_sweep_configs(bench):
    """--sweep-configs replaces the built-in candidates; the default config (an empty candidate) comes first."""
    assert bench._sweep_list("dkdv", None) == bench.SWEEP["dkdv"]
    assert bench._sweep_list("dkdv", ["32,64,8,3", "16,128,4,4"]) == [(), (32, 64, 8, 3), (16, 128, 4, 4)]
    assert bench._sweep_list("fused", ["16,64,64,32,4,3"]) == [(), (16, 64, 64, 32, 4, 3)]
    assert bench._candidate("dkdv", ()) == {}
    assert bench._candidate("dkdv", (32, 64, 8, 3)) == {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    assert bench._candidate("fused", (16, 64, 64, 32, 4, 3)) == {"BLOCK_M1": 16, "BLOCK_N1": 64, "BLOCK_M2": 64,
                                                                "BLOCK_N2": 32, "num_warps": 4, "num_stages": 3}
    for kernel, bad in (("dkdv", "32,64,8"), ("fused", "16,64,4,3"), ("dq", "32,x,4,3")):
        with pytest.raises(SystemExit, match=f"{kernel} takes"):
            bench._sweep_list(kernel, [bad])


def test_parse_args(bench, capsys):
    args = bench.parse_args(["--graph", "--sweep-configs", "32,64,4,3", "--methods", "triton", "triton_one_stream"])
    assert args.graph and args.graph_rounds == 3 and args.sweep_configs == ["32,64,4,3"]
    assert "triton_one_stream" in bench.VARIANTS
    with pytest.raises(SystemExit):
        bench.parse_args(["--graph-rounds", "0"])
    assert "--graph-rounds must be at least 1" in capsys.readouterr().err


def test_cache_sizes_rows(bench, capsys):
    """--cache-sizes: rows per cache size, each method's time divided by its own time at k = 0."""
    args = bench.parse_args(["--cache-sizes", "0", "128", "512"])
    assert args.cache_sizes == [0, 128, 512]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cache-sizes", "-1"])
    assert "--cache-sizes must be >= 0" in capsys.readouterr().err
    results = {("8x12x544x64", False, k): {m: {"ms": (ms, 3 * ms), "tflops": (1.0, 1.0), "err": ""}
                                            for m, ms in (("triton", 1.0 + k / 512), ("sdpa_causal", 0.5))}
               for k in (0, 512)}
    rows = bench.build_rows(results)
    at = {(r["cache"], r["method"], r["pass"]): r for r in rows}
    assert len(rows) == 8
    assert at[512, "triton", "fwd"]["time_vs_k0"] == 2.0 and at[512, "triton", "fwd+bwd"]["time_vs_k0"] == 2.0
    assert at[0, "triton", "fwd"]["time_vs_k0"] == 1.0
    assert at[512, "triton", "fwd"]["time_vs_sdpa_causal"] == 4.0
    table = bench.format_table(rows).splitlines()
    assert "| k |" in table[0] and "time / k=0" in table[0]
    assert any("| 512 | fwd | triton | 2.000 |" in line and "| 2.00 |" in line for line in table)
    no_plain = bench.build_rows({("1x1x64x16", True, 128): results[("8x12x544x64", False, 512)]})
    assert all(r["time_vs_k0"] != r["time_vs_k0"] for r in no_plain)  # NaN without a k = 0 run
