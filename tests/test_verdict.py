"""The report's headline verdict on constructed numbers whose answer is known by hand: the 95% interval of the
accuracy change (a t-table), the per-stratum verdict, and whether a change moves failures beyond the seed churn
(mean +- 2 std of the seed-to-seed counts), boundaries included."""
import pytest

from analysis import compare

T_975 = {2: 4.303, 4: 2.776}  # Student's t, two-sided 95%, by degrees of freedom (any t-table)


def row(delta: float, fixed: int, new: int, arch: str = "a") -> dict:
    return {"arch": arch, "baseline_acc": 0.5, "variant_acc": 0.5 + delta, "fixed": list(range(fixed)), "new": list(range(new))}


def test_interval95_is_the_t_interval_of_the_mean():
    low, high = compare.interval95([1.0, 2.0, 3.0])  # mean 2, sample std 1, n 3
    half = T_975[2] * 1.0 / 3 ** 0.5
    assert (low, high) == pytest.approx((2 - half, 2 + half), abs=1e-3)
    low, high = compare.interval95([0.0, 0.1, 0.2, 0.3, 0.4])  # mean 0.2, sample std sqrt(0.025)
    half = T_975[4] * 0.025 ** 0.5 / 5 ** 0.5
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-3)
    assert compare.interval95([0.7]) == (0.7, 0.7)


@pytest.mark.parametrize("deltas, verdict", [
    ([0.02, 0.03, 0.04], "an improvement"),  # mean 0.03, std 0.01: interval [0.0052, 0.0548] above 0
    ([-0.02, -0.03, -0.04], "a degradation"),
    ([0.05, -0.05, 0.0], "not distinguishable from seed noise"),  # interval [-0.124, 0.124] holds 0
    ([0.01, 0.05, 0.09], "not distinguishable from seed noise"),  # mean 0.05, std 0.04: [-0.049, 0.149] holds 0
    ([0.3], "a single pair, so no interval"),
])
def test_the_stratum_verdict_follows_the_interval(deltas, verdict):
    s = compare.stratum("a", [row(d, 1, 1) for d in deltas], None)
    assert s["verdict"] == verdict and s["pairs"] == len(deltas)
    assert s["delta"][0] == pytest.approx(sum(deltas) / len(deltas))


CHURN = {"pairs": 6, "fixed": (5.0, 1.0), "new": (3.0, 0.5)}  # seed-to-seed: 5 +- 1 fixed, 3 +- 0.5 introduced


@pytest.mark.parametrize("fixed, new, beyond", [
    ([5, 5, 5], [3, 3, 3], False),  # exactly the churn's means
    ([7, 7, 7], [3, 3, 3], False),  # fixed 2.0 above the mean = 2 std: on the boundary, not beyond
    ([7, 8, 7], [3, 3, 3], True),  # fixed mean 7.33: 2.33 > 2 std
    ([3, 3, 2], [3, 3, 3], True),  # fixed mean 2.67: 2.33 below
    ([5, 5, 5], [4, 4, 5], True),  # introduced mean 4.33: 1.33 > 2 x 0.5
    ([5, 5, 5], [4, 4, 4], False),  # introduced mean 4.0: 1.0 = 2 x 0.5, the boundary
])
def test_a_change_moves_failures_beyond_the_churn_only_outside_mean_plus_minus_two_std(fixed, new, beyond):
    s = compare.stratum("a", [row(0.01 * i, f, n) for i, (f, n) in enumerate(zip(fixed, new))], CHURN)
    assert s["fixed"][0] == pytest.approx(sum(fixed) / 3) and s["new"][0] == pytest.approx(sum(new) / 3)
    assert s["beyond_churn"] is beyond


def test_without_a_churn_reference_there_is_no_churn_verdict():
    assert compare.stratum("a", [row(0.1, 9, 0), row(0.2, 9, 0)], None)["beyond_churn"] is None


def test_strata_are_per_architecture_then_pooled_each_against_its_own_baseline_churn():
    from types import SimpleNamespace

    from tests.test_analysis import preds

    def run(arch: str, seed: int, failing: list[int]):  # 4 test images; confidently wrong on ``failing``
        probs = [[0.02, 0.96, 0.02] if i in failing else [0.95, 0.03, 0.02] for i in range(4)]
        return SimpleNamespace(name=f"{arch}-{seed}", params={"arch": arch, "augment": "none", "seed": str(seed)},
                               predictions=preds(probs, [0, 0, 0, 0]))

    runs = [run("a", 1, [0]), run("a", 2, [0, 1]), run("b", 1, []), run("b", 2, [])]  # churn: a moves 1 failure, b none
    rows = [row(0.1, 2, 0, "a"), row(0.2, 2, 0, "a"), row(0.1, 2, 0, "b"), row(0.1, 2, 0, "b")]
    strata = {s["stratum"]: s for s in compare.change_strata(runs, rows, ("augment", "none"), 0.9)}
    assert list(strata) == ["a", "b", "pooled over architectures"]
    # a: fixed 0->1 or 1->0 between its two seeds: fixed [0, 1], new [1, 0] -> 0.5 +- 0.707; 2 fixed is beyond (1.5 > 1.41)
    assert strata["a"]["churn"]["fixed"] == pytest.approx((0.5, 2 ** 0.5 / 2)) and strata["a"]["beyond_churn"] is True
    # b: no failure moves between seeds (0 +- 0): any fixed count is beyond
    assert strata["b"]["churn"] == {"pairs": 2, "fixed": (0.0, 0.0), "new": (0.0, 0.0)} and strata["b"]["beyond_churn"] is True
    pooled = strata["pooled over architectures"]
    assert pooled["pairs"] == 4 and pooled["churn"]["pairs"] == 4  # a's 2 ordered pairs and b's 2
