"""The documentation site's machinery: the nav, the API reference's coverage, the build hooks, the
generated tables, the publishing workflow and the browser check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

import mkdocs_hooks  # noqa: E402
from benchmarks import choose  # noqa: E402
from tests import browser_check  # noqa: E402


def _mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages.extend([value] if isinstance(value, str) else _nav_pages(value))
    return pages


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*):(?!=)", text, re.M))


def _recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert match, f"the Makefile has no recipe for {target}"
    return match.group(1)


# --- nav --------------------------------------------------------------------------------------
def test_every_notebook_is_in_the_nav():
    pages = _nav_pages(_mkdocs_config()["nav"])
    notebooks = sorted(p.name for p in (ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    missing = [n for n in notebooks if f"tutorials/{n}" not in pages]
    assert not missing, f"notebooks missing from mkdocs.yml's nav: {missing}"


def test_strict_build_fails_on_a_page_missing_from_the_nav(tmp_path):
    # the project's own validation settings, on a two-page site whose nav names one page
    validation = _mkdocs_config()["validation"]
    assert validation["nav"]["omitted_files"] == "warn"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n")
    (tmp_path / "docs" / "forgotten.md").write_text("# Forgotten\n")
    config = {"site_name": "t", "nav": ["index.md"], "validation": validation}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "out"]
    result = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "forgotten.md" in result.stderr
    # and the same site with the page in the nav builds
    config["nav"] = ["index.md", "forgotten.md"]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_new_pages_are_in_the_nav():
    pages = _nav_pages(_mkdocs_config()["nav"])
    for page in ("installation.md", "choosing-a-method.md", "troubleshooting.md"):
        assert page in pages and (ROOT / "docs" / page).exists(), page


# --- API reference ----------------------------------------------------------------------------
def _reference_directives() -> set[str]:
    found = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        found.update(re.findall(r"^::: (\S+)", page.read_text(), re.M))
    return found


def test_every_public_name_is_on_a_reference_page():
    directives = _reference_directives()
    # a module directive that lists all its members documents every name under it
    whole_modules = {"lightning_lowrank.analysis", "lightning_lowrank.demos"}
    identifiers = mkdocs_hooks.api_identifiers()
    assert "inject" in identifiers and "model_intruder_dimensions" in identifiers
    undocumented = [
        ident
        for ident in identifiers.values()
        if ident not in directives and ident.rsplit(".", 1)[0] not in whole_modules
    ]
    assert not undocumented, f"not on any reference page: {undocumented}"


def test_reference_is_split_by_area():
    pages = _nav_pages(_mkdocs_config()["nav"])
    reference = [p for p in pages if p.startswith("reference/")]
    assert len(reference) >= 6, reference


# --- hooks ------------------------------------------------------------------------------------
NOTEBOOK_HTML = """<div class="highlight-ipynb hl-python"><pre><span></span><span class="c1"># NBVAL_CHECK_OUTPUT</span>
<span class="nb">print</span>(1)
</pre></div>
<div class="clipboard-copy-txt" id="cell-3"># NBVAL_CHECK_OUTPUT
print(1)</div>
<div class="jp-OutputArea jp-Cell-outputArea">
<div class="jp-OutputArea-child">
<div class="jp-OutputPrompt jp-OutputArea-prompt"></div>
<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="application/vnd.jupyter.stderr" tabindex="0">
<pre>GPU available: False, used: False
</pre>
</div>
</div>
<div class="jp-OutputArea-child">
<div class="jp-OutputPrompt jp-OutputArea-prompt"></div>
<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="text/plain" tabindex="0">
<pre>1
</pre>
</div>
</div>
</div>
<!-- Load mathjax -->
<script src=""> </script>
<!-- End of mathjax configuration --><p>after</p>"""


def test_notebook_pages_lose_nbval_markers_stderr_and_the_mathjax2_loader():
    html = mkdocs_hooks.clean_notebook_html(NOTEBOOK_HTML)
    assert "NBVAL" not in html
    assert "GPU available" not in html and "vnd.jupyter.stderr" not in html
    assert '<script src="">' not in html
    # the code, its stdout output and the rest of the page stay
    assert '<span class="nb">print</span>(1)' in html
    assert 'id="cell-3">print(1)</div>' in html
    assert 'data-mime-type="text/plain"' in html and "<pre>1\n</pre>" in html
    assert html.endswith("<p>after</p>")


def test_api_names_in_prose_become_cross_references():
    ids = {"merge": "lightning_lowrank.merge", "LoRA": "lightning_lowrank.LoRA"}
    text = "\n".join(
        [
            "Call `merge` then `merge()`; `LoRA(rank=8)` and `other` stay.",
            "Linked: [`merge`](x.md) and [the `LoRA` class][lightning_lowrank.LoRA].",
            "```python",
            "`merge`",
            "```",
            "## `merge` in a heading",
        ]
    )
    out = mkdocs_hooks.link_api_names(text, ids).split("\n")
    assert out[0] == (
        "Call [`merge`][lightning_lowrank.merge] then [`merge()`][lightning_lowrank.merge]; "
        "`LoRA(rank=8)` and `other` stay."
    )
    assert out[1] == "Linked: [`merge`](x.md) and [the `LoRA` class][lightning_lowrank.LoRA]."
    assert out[3] == "`merge`" and out[5] == "## `merge` in a heading"


def test_mathjax_comes_from_a_package_not_a_cdn():
    es5 = mkdocs_hooks.mathjax_source()
    assert (es5 / "tex-mml-chtml.js").stat().st_size > 100_000
    config = _mkdocs_config()
    assert not any("://" in js for js in config["extra_javascript"])
    assert "javascripts/mathjax/tex-mml-chtml.js" in config["extra_javascript"]
    setup = (ROOT / "docs" / "javascripts" / "mathjax.js").read_text()
    # notebook Markdown cells keep $...$: MathJax must look for it there
    assert '["$", "$"]' in setup and '["$$", "$$"]' in setup and "jp-RenderedMarkdown" in setup


# --- generated tables -------------------------------------------------------------------------
def test_choosing_tables_show_the_result_files_numbers():
    speed = json.loads((choose.RESULTS / "speed.json").read_text())
    study = json.loads((choose.RESULTS / "study_methods.json").read_text())
    tables = choose.tables()
    lora = speed["training"]["methods"]["LoRA"]["ours"]
    row = next(r for r in tables["cost"].split("\n") if r.startswith("| LoRA |"))
    assert f"{lora['trainable']:,}" in row and f"{lora['ratio']:.2f}" in row
    # a configuration the file ran at one rate (so the row cannot have picked another)
    rates: dict[str, set] = {}
    for r in study["runs"]:
        rates.setdefault(r["config"], set()).add(r.get("lr"))
    config = next(c for c, lrs in rates.items() if len(lrs) == 1)
    accs = [r["test_acc"] for r in study["runs"] if r["config"] == config]
    mean = sum(accs) / len(accs)
    assert (
        f"| {config} | {mean:.3f} ({min(accs):.3f}-{max(accs):.3f}) | {len(accs)} |"
        in (tables["accuracy"])
    )


def test_choosing_picks_the_learning_rate_by_validation_not_test():
    runs = [
        {"config": "c", "lr": 1e-3, "val_acc": 0.9, "test_acc": 0.1, "trainable": 1},
        {"config": "c", "lr": 1e-4, "val_acc": 0.2, "test_acc": 0.8, "trainable": 1},
    ]
    (row,) = choose.accuracy_rows({"runs": runs})
    assert row[1].startswith("0.100") and row[3] == "0.001"


def test_choosing_page_markers_are_all_known():
    page = (ROOT / "docs" / "choosing-a-method.md").read_text()
    names = choose.MARKER.findall(page)
    assert {"cost", "accuracy"} <= set(names)
    assert "<!-- table:" not in choose.fill(page)
    with pytest.raises(KeyError, match="no table 'nope'"):
        choose.fill("<!-- table: nope -->")


# --- hosting ----------------------------------------------------------------------------------
def test_urls_agree_between_pyproject_and_mkdocs():
    import tomllib

    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    config = _mkdocs_config()
    assert urls["Documentation"] == config["site_url"]
    assert urls["Repository"] == config["repo_url"]
    assert config["site_url"].startswith("https://") and config["site_url"].endswith("/")
    assert config["edit_uri"].startswith("edit/main/docs")
    assert config["extra"]["version"]["provider"] == "mike"


def _workflow() -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / "docs.yml").read_text())


def test_docs_workflow_is_valid_and_runs_the_makefile_targets():
    workflow = _workflow()
    # PyYAML reads the key `on` as True
    triggers = workflow.get("on", workflow.get(True))
    assert triggers["push"]["branches"] == ["main"]
    assert any(t.startswith("v") for t in triggers["push"]["tags"])
    assert workflow["permissions"]["contents"] == "write"
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    assert all("uses" in s or "run" in s for s in steps)
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # mike needs the history of gh-pages
    runs = [s["run"] for s in steps if "run" in s]
    make_calls = [line.strip() for run in runs for line in run.splitlines() if "make " in line]
    targets = _makefile_targets()
    for call in make_calls:
        target = call.split()[1]
        assert target in targets, f"the workflow runs `{call}`; the Makefile has no {target}"
    assert "make browser-check" in make_calls
    dev = next(s for s in steps if "DOCS_VERSION=dev" in s.get("run", ""))
    assert dev["if"] == "github.ref == 'refs/heads/main'"
    assert "MIKE_PUSH=--push" in dev["run"]
    release = next(s for s in steps if "DOCS_ALIAS=latest" in s.get("run", ""))
    assert "refs/tags/v" in release["if"] and "${GITHUB_REF_NAME#v}" in release["run"]


def test_local_rehearsal_runs_the_same_mike_commands_as_the_workflow():
    publish, rehearsal = _recipe("publish-docs"), _recipe("docs-versions")
    assert "$(call mike_publish," in publish
    assert "$(call mike_publish,dev,)" in rehearsal
    assert "$(call mike_publish,$(PROJECT_VERSION),latest)" in rehearsal
    text = (ROOT / "Makefile").read_text()
    assert "mike_publish = $(MIKE) deploy $(MIKE_PUSH) --update-aliases $(1) $(2)" in text
    assert "browser-check" in _recipe_line("test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _recipe_line(target: str) -> str:
    return re.search(rf"^{target}:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)


# --- browser check ----------------------------------------------------------------------------
def test_raw_tex_is_recognised_and_plain_prose_is_not():
    assert browser_check.raw_tex(["the update \\(\\Delta W\\) here"])
    assert browser_check.raw_tex(["so $W_0 + s\\,BA$ is"])
    assert browser_check.raw_tex(["$$x = 1$$"])
    assert browser_check.raw_tex(["\\frac{a}{b}"])
    assert not browser_check.raw_tex(["costs $5 and $6 per run", "C:\\ path", "a_b and x^2"])


def test_requests_to_other_hosts_are_reported():
    origin = "http://127.0.0.1:8000"
    urls = [
        f"{origin}/javascripts/mathjax/tex-mml-chtml.js",
        "data:image/png;base64,AAAA",
        "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js",
        "https://api.github.com/repos/o/r",
        "https://fonts.googleapis.com/css?family=Roboto",
    ]
    assert browser_check.external_requests(urls, origin) == [
        "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js",
        "https://fonts.googleapis.com/css?family=Roboto",
    ]


def test_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text("<p id='here'>")
    (tmp_path / "index.html").write_text("")
    origin = "http://127.0.0.1:1"
    found = {
        "/index.html": {
            "links": [
                f"{origin}/a/#here",
                f"{origin}/a/#gone",
                f"{origin}/b/",
                "https://example.org/x",
            ],
            "ids": [],
        },
        "/a/index.html": {"links": [], "ids": ["here"]},
    }
    report = browser_check.Report()
    browser_check.check_links(tmp_path, origin, found, report)
    assert report.problems == {
        "/index.html": ["missing anchor: /a/#gone", "broken link: /b/"],
    }
    assert report.links == 3


@pytest.mark.skipif(browser_check.find_chromium() is None, reason="no Chromium installed")
def test_browser_check_reads_a_rendered_page(tmp_path):
    (tmp_path / "index.html").write_text(
        "<html><body><article><p>fine</p><p>left raw: $x^2$</p><code>$y^2$ in code</code>"
        "<a href='missing/'>a</a><a href='#top'>b</a>"
        "<div class='arithmatex' style='width:100px;overflow:hidden'>"
        "<span style='display:inline-block;width:300px'>wide</span></div>"
        "<div class='arithmatex' style='width:100px;overflow-x:auto'>"
        "<span style='display:inline-block;width:300px'>scrolls</span></div>"
        "</article><p id='top'></p>"
        "<script src='https://cdn.example.org/x.js'></script></body></html>"
    )
    report = browser_check.check_site(tmp_path, browser_check.find_chromium())
    assert report.pages == 1
    assert report.problems["/index.html"] == [
        "raw TeX: 'left raw: $x^2$'",
        "wide equation does not scroll: 'wide (200 px too wide)'",
        "equation wider than the 1280 px window's column (break it into lines): "
        "'scrolls (200 px too wide)'",
        "loads from another host: https://cdn.example.org/x.js",
        "broken link: /missing/",
    ]


def test_tutorials_index_lists_every_notebook():
    index = (ROOT / "docs" / "tutorials" / "index.md").read_text()
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        assert f"]({notebook.name})" in index, f"{notebook.name} is not in the tutorials index"


def test_links_named_after_a_tutorial_go_to_that_tutorial():
    # "[LoRA tutorial](...)" must open the notebook, not the tutorials index
    for page in (ROOT / "docs").rglob("*.md"):
        for text, target in re.findall(r"\[([^\]]*tutorial)\]\(([^)]+)\)", page.read_text()):
            assert target.endswith(".ipynb"), f"{page.name}: [{text}]({target})"


def test_snippets_resuming_from_last_ckpt_write_it():
    # ModelCheckpoint writes last.ckpt only with save_last=True
    for page in (ROOT / "docs").rglob("*.md"):
        text = page.read_text()
        if "last.ckpt" in text:
            assert "save_last=True" in text, page.name


def test_home_snippet_trains_the_new_head():
    home = (ROOT / "docs" / "index.md").read_text()
    snippet = home[home.index("```python") : home.index("```", home.index("```python") + 3)]
    assert 'train_modules=["classifier"]' in snippet


def test_docstrings_use_markdown_cross_references_not_sphinx_roles():
    # mkdocstrings renders Markdown: a Sphinx role such as :class:`X` would show up raw
    role = re.compile(r":(?:meth|class|func|attr|mod|data|exc|obj):`")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "lightning_lowrank").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if role.search(line) or "the module docstring" in line
    ]
    assert not found, f"Sphinx roles or references to an unrendered docstring: {found}"
