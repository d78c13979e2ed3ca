"""The alignment explorer without a kernel: the colour scale, the HTML (one span per token, its colour, escaping),
per-token details against generate's own figures, the latent inspector, live rescoring and error messages."""
import html
import logging
import math
import re
from html.parser import HTMLParser

import pytest
import torch

import saealign.registry as registry
import saealign.widgets as Wd
from saealign.reference import ReferenceSet, build_reference_prompts, compute_reference
from saealign.scoring import STORY_TOPICS
from saealign.calibration import DEFAULT_METHOD, PROTECTIONS
from saealign.methods import Clamp, Swap, Weight
from saealign.steering import generate
from saealign.render import NEUTRAL, TokenDetail, attribution_colour, contamination_colour, token_details, tokens_html, top_prompts
from saealign.widgets import CUSTOM, AlignmentExplorer, sae_and_method

SEA, FOOD = STORY_TOPICS["sea"], STORY_TOPICS["food"]


@pytest.fixture(scope="module")
def ref(model, sae, embedder):
    "A small reference (P3 prompts only): quick to build, and scoring needs nothing more for these checks."
    return compute_reference(model, sae, build_reference_prompts(300, seed=2), embedder, max_tokens=64, progress=False)


@pytest.fixture
def explorer(model, sae, ref, embedder):
    return AlignmentExplorer(model, sae, ref, embedder)


class Spans(HTMLParser):
    "The token spans of a page: column, background colour, data-contamination, title and text."

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.column, self.tokens, self._open = None, [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-column" in a:
            self.column = a["data-column"]
        if tag == "span" and a.get("class") == "sa-tok":
            colour = a["style"].split("background-color:")[1].strip()
            self._open = dict(column=self.column, colour=colour, c=float(a["data-contamination"]), title=a["title"], text="")
            self.tokens.append(self._open)
        elif self._open is not None:
            raise AssertionError(f"markup inside a token span: <{tag}>")

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = None

    def column_tokens(self, name):
        return [t for t in self.tokens if t["column"] == name]


# --- the colour scale ----------------------------------------------------------------------------

def test_colour_scale_known_values():
    assert [contamination_colour(c) for c in (0, 0.5, 1)] == ["#d9f0d3", "#fee08b", "#f46d43"]
    assert contamination_colour(0.75) == "#f9a667"  # halfway between the last two stops: (249, 166.5, 103)
    assert contamination_colour(-1) == contamination_colour(0) and contamination_colour(2) == contamination_colour(1)
    assert contamination_colour(None) == contamination_colour(float("nan")) == NEUTRAL


def test_colour_scale_gets_redder():
    rgb = [tuple(int(contamination_colour(i / 20)[k:k + 2], 16) for k in (1, 3, 5)) for i in range(21)]
    greens, blues = [g for _, g, _ in rgb], [b for _, _, b in rgb]
    assert greens == sorted(greens, reverse=True) and greens[0] - greens[-1] > 100
    assert blues[10:] == sorted(blues[10:], reverse=True)


# --- HTML of tokens --------------------------------------------------------------------------------

def test_tokens_html_escapes_and_keeps_whitespace():
    details = [TokenDetail("<b>", 0.0, [(3, 1.5, 0.9)]), TokenDetail(" a&b", 1.0, []),
               TokenDetail("\n", float("nan"), []), TokenDetail('"q"', 0.5, [])]
    page = tokens_html(details)
    assert "<b>" not in page and "&lt;b&gt;" in page and "a&amp;b" in page
    spans = Spans(f'<div data-column="x">{page}</div>').tokens
    assert [s["text"] for s in spans] == ["<b>", " a&b", "↵\n", '"q"']
    assert [s["colour"] for s in spans] == ["#d9f0d3", "#f46d43", NEUTRAL, "#fee08b"]
    assert spans[0]["title"] == "'<b>': contamination 0.00\nlatent 3: activation 1.50, score 0.90"
    assert spans[2]["title"].endswith("no active latent") and math.isnan(spans[2]["c"])


# --- per-token details -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [Swap, Weight, lambda s: Clamp(s, mode="add")], ids=["Swap", "Weight", "Clamp+"])
@pytest.mark.parametrize("output", ["reconstruction", "error"])
def test_token_details_match_generate(model, sae, explorer, make, output):
    "One uncached pass gives the contamination generate measured token by token with the KV cache."
    scores = explorer.score(SEA)
    method = make(scores)
    g = generate(model, sae, "Tom went to the", method, output=output, max_new_tokens=20, seed=4)[0]
    details = token_details(model, sae, g, scores, method)
    assert [d.piece for d in details] == g.pieces and len(details) == len(g.tokens) > 0
    assert torch.allclose(torch.tensor([d.contamination for d in details]), torch.tensor(g.contamination), atol=1e-4)
    for d in details:
        acts = [v for _, v, _ in d.latents]
        assert acts == sorted(acts, reverse=True) and all(v > 0 for v in acts) and len(acts) <= 5
        assert all(s == pytest.approx(float(scores.scores[i])) for i, _, s in d.latents)


def test_unsteered_details_are_the_saes_own_activations(model, sae, explorer):
    "Without a method the details read z = SAE(x) of the unmodified model at the hook."
    scores = explorer.score(SEA)
    g = generate(model, None, "The dog", max_new_tokens=8, seed=0)[0]
    details = token_details(model, sae, g, scores)
    ids = model.to_tokens(g.prompt + g.continuation)
    assert ids[0].tolist() == model.to_tokens(g.prompt)[0].tolist() + g.tokens  # the pieces re-tokenize alike
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=sae.cfg.metadata.hook_name)
        z = sae.encode(cache[sae.cfg.metadata.hook_name][0])
    n = len(ids[0]) - len(g.tokens)
    for j, d in enumerate(details):
        zj = z[n - 1 + j]
        assert d.latents[0][0] == int(zj.argmax()) and d.latents[0][1] == pytest.approx(float(zj.max()), rel=1e-4)
        expected = float(zj @ (1 - scores.scores) / zj.sum())
        assert d.contamination == pytest.approx(expected, rel=1e-4)


# --- render_html ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["Swap", "SAE", "Original"])
def test_render_html_one_span_per_token_with_its_colour(explorer, method):
    page = explorer.render_html("Once upon a time", SEA, method=method, max_new_tokens=24, seed=1, mode="raw")
    spans = Spans(page)
    plain, steered = explorer.columns
    assert (plain.name, steered.name) == ("unsteered", "steered") and plain.generation.method == "Original"
    for col in explorer.columns:
        found = spans.column_tokens(col.name)
        assert len(found) == len(col.generation.tokens) == len(col.details) > 0
        for s, d in zip(found, col.details):
            assert s["colour"] == contamination_colour(d.contamination) == contamination_colour(s["c"])
            assert s["text"].replace("↵\n", "\n") == d.piece
    assert len(spans.tokens) == len(plain.details) + len(steered.details)
    assert steered.generation.method == method
    if method == "SAE":  # spliced in unchanged, in the default `error` mode: exactly the model
        assert explorer.output.value == "error" and steered.generation.tokens == plain.generation.tokens
    if method == "Original":  # nothing steered: the two columns agree token for token
        assert steered.generation.tokens == plain.generation.tokens
        assert [d.contamination for d in steered.details] == [d.contamination for d in plain.details]
    assert set(explorer.chart.data["column"]) == {plain.label, steered.label}
    assert len(explorer.chart.data) == len(plain.details) + len(steered.details)


def test_render_html_output_none_uses_the_widget(explorer):
    explorer.output.value = "error"
    explorer.render_html("The cat", SEA, max_new_tokens=6)
    assert explorer.columns[1].generation.output == "error" and explorer.columns[1].label == f"{DEFAULT_METHOD} (error)"


def test_sae_and_method():
    s = torch.rand(512)
    assert sae_and_method("Original", s) == (False, None)
    use_sae, unchanged = sae_and_method("SAE", s)  # spliced in, left alone, its contamination still measured
    acts = torch.rand(3, 512)
    assert use_sae and torch.equal(unchanged.edit(None, acts, acts), acts) and unchanged.name == "SAE"
    assert isinstance(sae_and_method("Clamp", s)[1], Clamp) and isinstance(sae_and_method("Weight", s)[1], Weight)
    with pytest.raises(ValueError, match="unknown steering method 'swap'"):
        sae_and_method("swap", s)


def test_explorer_offers_a_method_registered_later(explorer, monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))  # the registration ends with the test
    before = [n for n in registry.method_names() if registry.method_needs_sae(n)]  # those that steer through the SAE
    assert before[:9 + len(PROTECTIONS)] == ["SAE", "Clamp", "Swap", "Weight", "OutputSwap", "OutputClamp", "AddSteer",
                                             "MatchedSteer", "DiffMeans", *PROTECTIONS]
    registry.register_method("Swap again", Swap)
    fresh = AlignmentExplorer(explorer.model, explorer.sae, explorer.reference, explorer.embedder)
    assert list(fresh.method.options) == ["Original", *before, "Swap again"]  # no prompting or fine-tuned baseline
    assert fresh.method.value == DEFAULT_METHOD
    fresh.render_html("The cat", SEA, method="Swap again", max_new_tokens=4)
    assert fresh.columns[1].generation.method == "Swap"


# --- the latent inspector ------------------------------------------------------------------------

def test_top_prompts_known_answer():
    summaries = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.0, 0.1], [0.2, 0.0, 0.8], [0.0, 1.0, 0.0]])
    ref = ReferenceSet.from_summaries(summaries, torch.eye(4), prompts=["a", "b", "c", "d"])
    assert top_prompts(ref, 0, 2) == [("b", pytest.approx(0.9)), ("a", pytest.approx(0.5))]
    assert top_prompts(ref, 2, 5) == [("c", pytest.approx(0.8)), ("b", pytest.approx(0.1))]
    assert top_prompts(ref, 1, 1) == [("d", pytest.approx(1.0))]


def test_inspector_lists_top_latents_with_counts_and_prompts(explorer, ref):
    page = explorer.inspector.value
    top = explorer.scores.top(10).tolist()
    assert [int(x) for x in re.findall(r'data-latent="(\d+)"', page)] == top
    first = top[0]
    row = page.split(f'data-latent="{first}"')[1].split("</tr>")[0]
    assert f"<td>{int(ref.prompt_counts[first])}</td>" in row and f"{float(explorer.scores.scores[first]):.3f}" in row
    assert html.escape(" ".join(top_prompts(ref, first, 1)[0][0].split())[:60]) in row


# --- the widget ------------------------------------------------------------------------------------

def test_click_renders_what_render_html_gives(explorer):
    explorer.method.value, explorer.output.value = "Weight", "error"
    explorer.max_new_tokens.value, explorer.seed.value, explorer.prompt.value = 10, 3, "Lily saw"
    explorer.button.click()
    assert explorer.progress.value == 4 and explorer.progress.bar_style == "success"
    assert not explorer.button.disabled and explorer.button.description == "Generate"
    assert "generated in" in explorer.status.value
    spans = Spans(explorer.view.value)
    assert 0 < len(spans.column_tokens("steered")) <= 10 and 0 < len(spans.column_tokens("unsteered")) <= 10
    assert explorer.view.value == explorer.render_html("Lily saw", SEA, method="Weight", output="error",
                                                       max_new_tokens=10, seed=3)
    assert explorer.chart_view.value.startswith("<svg")


def test_live_rescoring(explorer):
    sea = explorer.scores
    assert explorer.topic.value == "sea" and sea.align_texts == SEA and "scored 512 latents" in explorer.status.value
    explorer.topic.value = "food"
    assert explorer.texts.value == "\n".join(FOOD) and explorer.scores.align_texts == FOOD
    assert not torch.equal(explorer.scores.scores, sea.scores)
    explorer.texts.value = "The boat sailed on the sea.\n\n  Fish swam in the water.  \n"
    assert explorer.topic.value == CUSTOM
    assert explorer.scores.align_texts == ["The boat sailed on the sea.", "Fish swam in the water."]
    explorer.texts.value = "\n".join(SEA)  # typing a topic's texts selects the topic, scores come from memory
    assert explorer.topic.value == "sea" and explorer.scores is sea


def test_errors_show_as_messages(explorer, monkeypatch, caplog):
    explorer.button.click()
    before = explorer.view.value

    explorer.texts.value = "   \n"
    assert "⚠ align_texts is empty" in explorer.status.value and explorer.scores is None
    explorer.button.click()
    assert "⚠ align_texts is empty" in explorer.status.value and explorer.progress.bar_style == "danger"
    assert explorer.view.value == before and not explorer.button.disabled

    explorer.topic.value = "sea"
    explorer.prompt.value = "word " * 600
    explorer.button.click()
    assert "passes the model&#x27;s context" in explorer.status.value and "Traceback" not in explorer.status.value

    def boom(*a, **k):
        raise RuntimeError("boom\nwith a second line")
    monkeypatch.setattr(Wd, "generate", boom)
    monkeypatch.setattr(Wd, "side_by_side", boom)
    explorer.prompt.value = "Hi"
    with caplog.at_level(logging.ERROR, logger="saealign.widgets"):
        explorer.button.click()
    assert explorer.status.value.endswith("⚠ RuntimeError: boom</span>")  # one short line
    assert "Traceback" in caplog.text  # the traceback goes to the log, not the widget
    assert explorer.view.value == before


def test_reference_from_another_sae_is_refused(model, ref, embedder):
    from saealign.saes import load_sae
    other = load_sae("saealign-stories260K", "blocks.0.hook_resid_post", model=model)
    with pytest.raises(ValueError, match="another SAE"):
        AlignmentExplorer(model, other, ref, embedder)


def test_colour_toggle_recolours_without_generating(explorer, monkeypatch):
    explorer.method.value, explorer.max_new_tokens.value = "Swap", 12
    explorer.button.click()
    shown = Spans(explorer.view.value).column_tokens("steered")
    assert [t["colour"] for t in shown] == [contamination_colour(d.calibrated) for d in explorer.columns[1].details]
    monkeypatch.setattr(Wd, "generate", lambda *a, **k: pytest.fail("the toggle must not generate again"))
    explorer.mode.value = "attribution"
    recoloured = Spans(explorer.view.value).column_tokens("steered")
    assert [t["text"] for t in recoloured] == [t["text"] for t in shown]
    assert [t["colour"] for t in recoloured] == [attribution_colour(d.attribution) for d in explorer.columns[1].details]
    assert 'data-mode="attribution"' in explorer.view.value


def test_export_button_writes_the_selected_steer_or_says_why_not(explorer, tmp_path):
    from saealign.export import load_vector
    explorer.method.value, explorer.export_path.value = "DiffMeans", str(tmp_path / "sea.safetensors")
    explorer.export_button.click()
    assert "exported DiffMeans to" in explorer.status.value
    sv = load_vector(tmp_path / "sea.safetensors")
    assert sv.vector.shape == (explorer.sae.cfg.d_in,) and sv.vector.norm() > 0
    explorer.method.value, explorer.export_path.value = "Swap", str(tmp_path / "swap.gguf")
    explorer.export_button.click()
    assert not (tmp_path / "swap.gguf").exists() and "additive" in explorer.status.value.lower()
