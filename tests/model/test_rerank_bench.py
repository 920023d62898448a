"""bench/bench_rerank.py's figure rules (issue 15): where the eager queries go, and that a target's ratio pairs
each eager query with our calls of its own round, not with the median of all of ours."""

from __future__ import annotations

import importlib
import sys

import pytest

from albef.model.config import get_config
from albef.model.itm_flops import dims_of, i2t_query_macs
from tests.helpers import REPO


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - the bench module
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("bench_rerank")
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.mark.parametrize(
    ("reps", "eager", "want"),
    [(15, 5, [1, 4, 7, 10, 13]), (15, 3, [2, 7, 12]), (4, 4, [0, 1, 2, 3]), (2, 3, [0, 1]), (15, 1, [7])],
)
def test_eager_rounds_spread_over_the_case(bench, reps: int, eager: int, want: list[int]) -> None:
    assert bench.eager_rounds(reps, eager) == want


# Three rounds of 4 image->text pairs, eager timed in rounds 0 and 2; the machine twice as fast in round 2 as in
# round 0, eager and ours alike; GEMM peaks 100 GFLOP/s fp32, 200 GOP/s int8.
TWO_EAGER_ROUNDS = {
    "seconds": {"eager": 3.0, "fp32": 0.4, "int8": 0.2},
    "all": {"eager": [4.0, 2.0], "fp32": [0.4, 1.0, 0.2], "int8": [0.2, 0.5, 0.1]},
    "eager_rounds": [0, 2],
    "lengths": [[10] * 4] * 3,
    "paired_peaks": [{"fp32": 100.0, "int8": 200.0}] * 3,
}


def _figures(bench) -> dict:  # noqa: ANN001 - the bench module
    dims = dims_of(get_config("albef-tiny"))
    return bench.figures(4, "i2t", TWO_EAGER_ROUNDS, dims, {"fp32_gflops": 100.0, "int8_gops": 200.0}, 100.0)


def test_eager_ratio_is_paired_by_round(bench) -> None:
    f = _figures(bench)
    assert f["vs_eager_paired"] == {"fp32": 10.0, "int8": 20.0}  # 4/0.4 and 2/0.2; 4/0.2 and 2/0.1
    assert f["vs_eager"] == {"fp32": 7.5, "int8": 15.0}  # the ratio of the medians, kept beside it


def test_eager_ceiling_is_the_paired_ratio_at_the_paired_peaks(bench) -> None:
    f = _figures(bench)
    m, dims = TWO_EAGER_ROUNDS, dims_of(get_config("albef-tiny"))
    q = i2t_query_macs(dims, [10] * 4)
    # every product at the peak: fp32 all at 100 GFLOP/s; int8 the weight products at 200 GOP/s
    at_peak = {"fp32": q.flops / 100e9, "int8": 2 * q.weight / 200e9 + 2 * q.activation / 100e9}
    for v in ("fp32", "int8"):
        want = sorted(e / at_peak[v] for e in m["all"]["eager"])
        assert f["vs_eager_ceiling_paired"][v] == pytest.approx(sum(want) / 2, rel=1e-3)
        assert f["vs_eager_ceiling_paired"][v] > f["vs_eager_paired"][v]  # our calls ran below the peaks
