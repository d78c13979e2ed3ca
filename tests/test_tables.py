"""Reading a grid's rows (saealign.tables) on tables built by hand: paired verdicts and their ties, summaries, the
harmonic score, and charts that hold only what they plot."""
import math

import pandas as pd
import pytest

from saealign.tables import (best_method, compare, config_label, method_table, metric_chart, seed_noise,
                             summary_table, verdict_counts, verdicts, versus, with_harmonic)


def paired(diffs, metric="centroid_cosine", method="Swap"):
    "A grid of one topic: Original at 0 and `method` at each of `diffs`, one prompt each."
    return pd.DataFrame([dict(topic="t", prompt=p, seed=0, layer=-1, output="", method=m, **{metric: v})
                         for p, d in enumerate(diffs) for m, v in (("Original", 0.0), (method, d))])


def test_paired_verdict_is_a_tie_inside_two_standard_errors():
    # differences lift ± 1: std sqrt(4/3), SE 1/sqrt(3) ≈ 0.577, so 2 SE ≈ 1.155
    for lift, verdict in ((1.1, "tie"), (1.2, "better"), (-1.1, "tie"), (-1.2, "worse"), (0.0, "tie")):
        row = compare(paired([lift + 1, lift - 1, lift + 1, lift - 1]), "centroid_cosine").iloc[0]
        assert row.n == 4 and row.mean_diff == pytest.approx(lift) and row.se == pytest.approx(1 / math.sqrt(3))
        assert row.verdict == verdict, lift


def test_paired_verdict_follows_the_metrics_direction():
    assert compare(paired([1.0, 1.0]), "centroid_cosine").verdict[0] == "better"
    assert compare(paired([1.0, 1.0], "perplexity"), "perplexity").verdict[0] == "worse"  # lower is better
    assert compare(paired([1.0]), "centroid_cosine").verdict[0] == "tie"  # one pair: no spread, no verdict
    with pytest.raises(ValueError, match="unknown metric 'harmonic'"):
        compare(paired([1.0, 1.0], "harmonic"), "harmonic")
    assert compare(paired([1.0, 1.0], "harmonic"), "harmonic", higher_is_better=True).verdict[0] == "better"


def test_summary_and_verdicts_on_a_hand_built_grid():
    hand = pd.DataFrame([dict(topic=t, prompt=p, seed=0, method=m, layer=-1 if m == "Original" else 6, output="error",
                              centroid_cosine=v, perplexity=10.0)
                         for t in ("a", "b") for p in range(4) for m, v in (("Original", 0.1), ("Swap", 0.3 + 0.1 * (t == "b")))])
    assert config_label(hand).unique().tolist() == ["Original +err", "Swap L6 +err"]
    table = summary_table(hand, ("centroid_cosine",))
    assert table.loc["centroid_cosine", "Original +err"] == "0.1 ± 0" and table.loc["centroid_cosine", "Swap L6 +err"] == "0.35 ± 0.0535"
    v = verdicts(hand, ("centroid_cosine", "perplexity"))
    assert len(v) == 4 and set(v[v.metric == "perplexity"].verdict) == {"tie"}
    assert verdict_counts(v).loc["Swap L6 +err"].tolist() == ["2 / 0 / 0", "0 / 2 / 0"]


def test_seed_noise_on_known_numbers():
    rows = pd.DataFrame([dict(topic="t", prompt=p, seed=s, method="Original", perplexity=10.0 + s + 2 * p)
                         for p in range(3) for s in range(2)])
    noise = seed_noise(rows, ("perplexity",)).iloc[0]
    assert noise.std_one_generation == pytest.approx(math.sqrt(0.5)) and noise.std_of_mean == pytest.approx(math.sqrt(0.5))


def test_harmonic_score_and_methods_against_a_baseline():
    hand = pd.DataFrame(dict(centroid_cosine=[0.5, -0.2, 0.5], acceptability=[0.5, 0.9, float("nan")], relevance=[0.5, 0.9, 0.5]))
    scored = with_harmonic(hand)
    assert scored.harmonic.tolist()[:2] == pytest.approx([0.5, 0.0]) and math.isnan(scored.harmonic[2])
    rows = pd.DataFrame([dict(topic=t, prompt=p, seed=0, method=m, centroid_cosine=c, acceptability=0.8, relevance=0.5)
                         for t in ("t1", "t2") for p in range(6)
                         for m, c in (("A", 0.25), ("B", 0.5), ("C", 0.25 + (0.125 if p % 2 else -0.125)))])
    v = versus(rows, "A", "concept").set_index(["topic", "method"])
    assert v.verdict.to_dict() == {("t1", "B"): "better", ("t1", "C"): "tie", ("t2", "B"): "better", ("t2", "C"): "tie"}
    assert v.loc[("t1", "B"), "cell"] == "+0.250 ± 0.000 better"
    assert method_table(rows, ("concept",), order=("C", "B", "A")).concept.tolist() == ["0.25 ± 0.075", "0.5 ± 0", "0.25 ± 0"]
    assert best_method(rows, ("A", "C")) == "A" and best_method(rows, ("A", "B", "C", "Z")) == "B"


def test_grid_charts_hold_only_their_summaries():
    grid = pd.DataFrame([dict(topic="t", prompt=p, seed=s, method=m, layer=-1 if m == "Original" else 2, output="",
                              continuation="a long continuation " * 20, perplexity=1.0 + p, acceptability=0.5,
                              centroid_cosine=0.1 * s, topic_word_rate=0.0, contamination=0.2)
                         for p in range(10) for s in range(2) for m in ("Original", "Swap")])
    spec = metric_chart(grid).to_dict()
    plotted = [row for rows in spec["datasets"].values() for row in rows]
    assert {k for row in plotted for k in row} <= {"config", "method", "mean", "lo", "hi"}
    assert len(plotted) <= 2 * 2 * 5  # per configuration and metric: the point's row and the rule's
