"""experiments/attributions.py in --quick mode: it trains, draws its figures and writes its
report, and its numbers say the attributions are right (they agree with jax.grad, integrated
gradients are complete) and mean something (deleting the pixels they rank highest hurts more
than deleting random ones)."""

import numpy as np
from test_experiments import _run


def test_attributions_quick_trains_agrees_with_jax_grad_and_completes(tmp_path):
    out, results, config, report = _run("attributions", tmp_path)
    assert {p.name for p in out.glob("*.png")} == {"attributions.png", "checks.png"}
    assert results["test_accuracy"] > 0.85  # 3 epochs of Adam (measured 0.964); chance is 0.1
    for row in results["agreement"]["rows"]:
        # float32: the same sums in another order differ by ~1e-7 relative (measured ≤ 5e-7)
        assert row["max_relative_difference"] < 1e-5, row
        assert row["seconds"] > 0 and row["seconds_jax_grad"] > 0
    gaps = {r["steps"]: r["median"] for r in results["completeness"]}
    assert set(gaps) == set(config["gap_steps"]) == {8, 256}
    assert gaps[256] < gaps[8] and gaps[256] < 5e-3  # measured 6.7e-3 -> 1.2e-3
    d = results["deletion"]
    k = d["k"].index(16)
    # IG's top 16 of 64 pixels carry the class (measured 0.072 left; random: 0.872)
    assert d["integrated gradients"][k] < 0.5 < d["random"][k]
    shown = np.asarray(results["shown"]["y"])
    np.testing.assert_array_equal(shown, np.arange(10))  # the first test digit of each class
    assert "## Completeness of integrated gradients" in report
