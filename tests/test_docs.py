"""The documentation site: the Quarto config nbdev_docs reads, its notebooks, one chapter rendered to HTML
(nbconvert, since Quarto cannot be installed here) and loaded in headless Chromium, and README's headline figures
against the committed results files they come from."""
import json
import re

import pandas as pd
import pytest
import yaml
from nbdev.config import get_config
from nbdev.quarto import _nbdev_yml

from saealign.grid import read_rows
from saealign.tables import verdict_table, with_harmonic

from browser_support import ARTIFACTS, ROOT, dump_dom, skip_reason

STAGES = ["index.ipynb", "01_reference.ipynb", "02_scoring.ipynb", "03_steering.ipynb", "04_metrics.ipynb",
          "05_widgets.ipynb"]


@pytest.fixture(scope="module")
def cfg():
    return get_config(path=ROOT)


@pytest.fixture(scope="module")
def site(cfg):
    # nbdev 2's proc_nbs / nbdev_docs read exactly this file (nbs_path/_quarto.yml) and render in a copy of nbs/
    return yaml.safe_load((cfg.nbs_path / "_quarto.yml").read_text())


def test_site_lists_existing_notebooks_in_the_sidebar(cfg, site):
    render = site["project"]["render"]
    assert render == site["website"]["sidebar"]["contents"], "the sidebar shows every rendered page, in order"
    assert render[0] == "index.ipynb" and set(STAGES) <= set(render)
    assert len(set(render)) == len(render)
    missing = [nb for nb in render if not (cfg.nbs_path / nb).is_file()]
    assert not missing, f"listed in nbs/_quarto.yml but not in nbs/: {missing}"
    chapters = sorted(p.name for p in cfg.nbs_path.glob("[0-9][0-9]_*.ipynb"))  # every main chapter is on the site
    assert set(chapters) <= set(render), set(chapters) - set(render)


def test_nbdev_settings_point_at_the_site(cfg, site):
    assert "nbdev.yml" in site["metadata-files"]
    # nbdev_docs rewrites nbs/nbdev.yml from settings.ini: the committed one must be what it writes
    vals = {k: cfg[k] for k in ["title", "description", "branch", "git_url", "doc_host", "doc_baseurl"]}
    expected = _nbdev_yml.format(**vals, doc_path=cfg.doc_path.name)
    assert (cfg.nbs_path / "nbdev.yml").read_text() == expected
    assert yaml.safe_load(expected)["project"]["output-dir"] == "_docs" == cfg.doc_path.name
    # True: nbdev leaves the sidebar above alone instead of writing a sidebar.yml of every notebook
    assert cfg.custom_sidebar is True


def test_root_site_config_matches_the_one_nbdev_reads(site):
    root = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    prefixed = ["nbs/" + page for page in site["project"]["render"]]
    assert root["project"]["render"] == prefixed == root["website"]["sidebar"]["contents"]
    assert root["project"]["output-dir"] == "_docs" and root["format"] == site["format"]
    assert all((ROOT / page).is_file() for page in prefixed)


@pytest.mark.skipif(skip_reason(node=False) is not None, reason=str(skip_reason(node=False)))
def test_chapter_renders_to_html_and_loads_in_chromium():
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter(template_name="lab").from_filename(str(ROOT / "nbs" / "05_widgets.ipynb"))
    out = ARTIFACTS / "docs" / "05_widgets.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body)
    dom = dump_dom(out.as_uri())
    text = re.sub(r"<[^>]+>", "", dom)
    assert re.search(r"<h1[^>]*>\s*Widgets: the alignment explorer", dom)
    assert "class AlignmentExplorer" in text and "def sae_and_method" in text
    assert "On the embedded default" in text and "Traceback" not in text
    assert dom.count('class="jp-Cell ') >= 19  # every cell of the chapter made it to the page


def chapter_table(markdown: str) -> dict[str, str]:
    "Notebook -> module of the README's chapter table (rows `| `nb.ipynb` | `module` | ... |`; '—' for none)."
    rows = re.findall(r"^\| `([\w.]+\.ipynb)` \| (`[\w.]+`|—) \|", markdown, re.M)
    return {nb: module.strip("`") for nb, module in rows}


def test_title_cells_hold_only_title_and_description(cfg):
    "nbdev makes a chapter's first titled markdown cell its front matter and drops the rest of it from the site."
    from nbdev.frontmatter import FrontmatterProc
    from execnb.nbio import read_nb
    for path in sorted(cfg.nbs_path.glob("*.ipynb")):
        nb = read_nb(path)
        title = next(c for c in nb.cells if c.cell_type == "markdown")
        kept = [line for line in title.source.splitlines() if line.strip()]
        assert [line[:2] for line in kept] == ["# ", "> "], f"{path.name}: {kept[2:3] or kept}"
        proc = FrontmatterProc(nb)
        proc.begin()
        proc.cell(title)
        assert proc.fm["description"] == kept[1][2:].strip(), path.name  # the whole description, on one line


def test_the_readme_chapter_table_lists_every_notebook_with_its_module(cfg):
    readme = (ROOT / "README.md").read_text()
    table = chapter_table(readme)
    notebooks = sorted(p.name for p in cfg.nbs_path.glob("*.ipynb") if p.name != "index.ipynb")
    assert sorted(table) == notebooks, "README's chapter table names exactly the notebooks in nbs/"
    for nb, module in table.items():
        found = re.search(r"#\|\s*default_exp\s+([\w.]+)", (cfg.nbs_path / nb).read_text())
        expected = "—" if found is None else ("saealign" if found[1] == "__init__" else f"saealign.{found[1]}")
        assert module == expected, f"{nb} exports {expected}, README's table says {module}"
    index = (cfg.nbs_path / "index.ipynb").read_text()
    assert all(f"| `{nb}` |" in index for nb in table), "the index page's table lists the same notebooks"


def prose(text: str) -> str:
    "`text` with each run of whitespace as one space: a figure may be wrapped over two lines."
    return " ".join(text.split())


@pytest.fixture(scope="module")
def front_pages() -> dict[str, str]:
    "README and the docs home page (which carries the same text), as prose."
    index = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    return {"README.md": prose((ROOT / "README.md").read_text()),
            "nbs/index.ipynb": prose("\n".join("".join(cell["source"]) for cell in index["cells"]))}


def results_grid(name: str) -> pd.DataFrame:
    "A committed grid file of results/, with the harmonic score its chapters read."
    return with_harmonic(pd.DataFrame(read_rows(ROOT / "results" / name)))


def mean_se(grid: pd.DataFrame, method: str) -> str:
    "Mean harmonic score ± its standard error over `method`'s generations, as 04i's summary prints it."
    harmonic = grid[grid.method == method].harmonic
    return f"{harmonic.mean():.3f} ± {harmonic.sem():.3f}"


def assert_on_front_pages(pages: dict[str, str], figure: str):
    for page, text in pages.items():
        assert figure in text, f"{page} should say {figure!r}, what the results file gives"


def test_readme_calibrated_figures_are_the_grid_files(front_pages):
    tuning = results_grid("grid-gemma-3-270m-calibrated-tuning.jsonl")
    frozen = results_grid("grid-gemma-3-270m-calibrated-frozen.jsonl")
    assert_on_front_pages(front_pages, f"harmonic {mean_se(tuning, 'TopicSteer-instructed')} against the "
                                       f"instruction's {mean_se(tuning, 'PromptingWords')}")
    assert_on_front_pages(front_pages, f"(harmonic {mean_se(frozen, 'TopicSteer-instructed')} against "
                                       f"{mean_se(frozen, 'PromptingWords')})")


def test_readme_comparison_means_are_the_grid_file(front_pages):
    means = results_grid("grid-gemma-3-270m-comparison.jsonl").groupby("method").harmonic.mean()
    assert_on_front_pages(front_pages, f"prompting {means['Prompting']:.3f}, **MatchedSteer "
                                       f"{means['MatchedSteer']:.3f}**, the difference of means {means['DiffMeans']:.3f}")


def test_readme_swap_alignment_is_the_paper_grid_file(front_pages):
    swap = verdict_table(results_grid("grid-gemma-3-270m.jsonl"), "centroid_cosine")["Swap L6 +err"]
    change = {topic: swap[topic].rsplit(" ", 1) for topic in ("sycophancy-20", "amazon-20")}  # "+x ± y", verdict
    assert all(verdict == "better" for _, verdict in change.values())
    assert_on_front_pages(front_pages, f"centroid cosine {change['sycophancy-20'][0]} on sycophancy, "
                                       f"{change['amazon-20'][0]} on Amazon reviews")


def test_readme_demo_timings_are_the_bench_file(front_pages):
    bench = json.loads((ROOT / "results" / "bench-demo.json").read_text())
    fresh = bench["install_s"] + bench["cold_demo_s"]
    assert_on_front_pages(front_pages, f"prints the steered continuation {fresh:.0f} s after it starts (the install "
                                       f"{bench['install_s']:.0f} s")
    assert_on_front_pages(front_pages, f"then {bench['cold_demo_s']:.0f} s of demo")
    assert_on_front_pages(front_pages, f"A warm run takes {min(bench['warm_demo_s']):.0f} s (best of "
                                       f"{len(bench['warm_demo_s'])}")
    assert_on_front_pages(front_pages, f"side by side in {bench['explorer_new_topic_s']:.1f} s the first time and "
                                       f"{bench['explorer_seen_topic_s']:.1f} s the next")


def test_readme_calibration_cost_is_the_bench_file(front_pages):
    measured = re.search(r"wall ([\d.]+) s, CPU ([\d.]+) s", (ROOT / "results" / "bench-calibration.txt").read_text())
    wall, cpu = (float(v) for v in measured.groups())
    assert_on_front_pages(front_pages, f"calibrated once ({wall:.0f} s, {cpu:.0f} s of CPU for the default steer")


def test_readme_export_speeds_are_the_bench_file(front_pages):
    text = (ROOT / "results" / "bench-export.txt").read_text()
    speed = {engine: float(re.search(rf"^{re.escape(engine)}\b.*?\s([\d.]+)\s+[\d.]+\s*$", text, re.M)[1])  # tokens/s
             for engine in ("saealign", "transformers", "llama.cpp")}
    assert_on_front_pages(front_pages, f"at {speed['llama.cpp']:.0f} steered tokens/s against saealign's "
                                       f"{speed['saealign']:.0f} and transformers' {speed['transformers']:.0f}")


def test_readme_warm_load_is_the_models_chapter_output(front_pages):
    saved = "".join("".join(o.get("text", "")) for c in json.loads((ROOT / "nbs" / "00a_models.ipynb").read_text())["cells"]
                    for o in c.get("outputs", []))
    seconds = re.search(r"warm load ([\d.]+) s", saved)[1]
    assert_on_front_pages(front_pages, f"warm load takes {seconds} s")
