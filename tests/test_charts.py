"""The one chart helper (saealign.charts): a chart embeds only the columns its encoding reads, whatever form the
encoding takes (shorthand, altair channel, tooltip list), in single and layered charts."""
import altair as alt
import pandas as pd

from saealign.charts import _fields, chart


def columns(spec: dict, view: dict | None = None) -> set[str]:
    "The columns of the data a unit chart (`view`, else the whole spec) embeds."
    return set(spec["datasets"][(view or spec)["data"]["name"]][0])


def test_the_columns_an_encoding_reads():
    assert _fields("mean:Q") == {"mean"} and _fields("count():Q") == set()
    assert _fields(alt.X("size:Q", title="prompts")) == {"size"}
    assert _fields(alt.Y(field="share", type="quantitative")) == {"share"}
    assert _fields(["k", alt.Tooltip("share:Q", format=".3f")]) == {"k", "share"}
    assert _fields(alt.value("red")) == set()


def test_charts_hold_only_the_columns_they_plot():
    df = pd.DataFrame(dict(x=[1, 2], y=[3.0, 4.0], label=["a", "b"], unused=["long text"] * 2))
    spec = chart(df, "line", width=100, title="t", x="x:Q", y="y:Q", tooltip=["label"]).to_dict()
    assert columns(spec) == {"x", "y", "label"} and spec["width"] == 100 and spec["title"] == "t"
    counted = chart(df, "bar", mark_options=dict(opacity=0.5), x=alt.X("x:Q", bin=True), y="count():Q").to_dict()
    assert columns(counted) == {"x"} and counted["mark"] == {"type": "bar", "opacity": 0.5}


def test_each_layer_holds_its_own_columns():
    df = pd.DataFrame(dict(size=[1, 2], mean=[0.5, 0.6], lo=[0.4, 0.5], hi=[0.6, 0.7], note="unused"))
    spec = (chart(df, "area", x="size:Q", y="lo:Q", y2="hi:Q") + chart(df, "line", x="size:Q", y="mean:Q")).to_dict()
    assert [columns(spec, layer) for layer in spec["layer"]] == [{"size", "lo", "hi"}, {"size", "mean"}]
