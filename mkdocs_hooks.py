"""MkDocs hooks: what the site needs beyond the plugins' defaults.

- **Notebook pages** (mkdocs-jupyter renders them from the outputs stored in the notebooks):
  - a notebook links to pages relative to its own folder (``../concepts/lora.md``), right in Jupyter
    and on GitHub; ``tutorials/01_lora.ipynb`` is rendered as ``tutorials/01_lora/index.html`` with
    the links untouched, one level off and still ending in ``.md``. They are rewritten to the built
    pages' URLs, and a link to a missing page is a warning (an error with ``--strict``);
  - the ``# NBVAL_...`` markers that tell nbval how to compare a cell are dropped from the shown
    source, and so are stderr streams (Lightning's "GPU available" lines, progress bars, tips):
    the notebooks keep them, the pages do not show them as error boxes;
  - the MathJax 2 loader nbconvert's template adds (an empty ``src``) is removed: the site's own
    MathJax 3 typesets notebooks too (``docs/javascripts/mathjax.js``);
  - a download link to the notebook (mkdocs-jupyter copies it next to the page) heads the page,
    and the edit link points at the notebook in ``tutorials/`` rather than the ``docs/`` symlink.
- **API names link to the reference**: in the Markdown pages, an inline code span that is exactly
  a public name (`` `LowRankCallback` ``, `` `merge()` ``) becomes a cross-reference that
  mkdocs-autorefs resolves to its entry in the API reference.
- **Generated tables**: ``<!-- table: NAME -->`` markers are filled from ``benchmarks/results/``
  by ``benchmarks/choose.py``.
- **MathJax from a package**: the ``es5`` build of the ``django-static-mathjax`` package (the docs
  extra; a plain copy of MathJax with no dependencies) is copied into ``javascripts/mathjax/`` of
  the site, so pages load it from the site itself and work offline.
"""

from __future__ import annotations

import ast
import html as html_lib
import importlib.util
import logging
import posixpath
import re
import shutil
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.lowrank")
ROOT = Path(__file__).resolve().parent
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "output/chtml.js", "ui", "a11y")

# --- notebook pages ---------------------------------------------------------------------------
_HREF = re.compile(r'href="(?!https?:|mailto:|#|/)([^"#]+?\.(?:md|ipynb))(#[^"]*)?"')
# in the highlighted source, and at a line start of the plain copy the copy button uses
_NBVAL = re.compile(r'<span class="c1">#\s*NBVAL_[A-Z_]+[^<]*</span>\n?')
_NBVAL_COPY = re.compile(
    r'(<div class="clipboard-copy-txt"[^>]*>|^)#\s*NBVAL_[A-Z_]+[^\n<]*\n', re.MULTILINE
)
_STDERR = re.compile(
    r'<div class="jp-OutputArea-child">\s*<div class="jp-OutputPrompt jp-OutputArea-prompt">'
    r'[^<]*</div>\s*<div class="jp-RenderedText jp-OutputArea-output" '
    r'data-mime-type="application/vnd\.jupyter\.stderr"[^>]*>\s*<pre>.*?</pre>\s*</div>\s*</div>\s*',
    re.DOTALL,
)
_MATHJAX2 = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)


def _rewrite_links(html: str, page, files) -> str:
    source = page.file.src_uri
    folder = posixpath.dirname(source)

    def rewrite(match: re.Match[str]) -> str:
        target = posixpath.normpath(posixpath.join(folder, match.group(1)))
        anchor = match.group(2) or ""
        linked = files.get_file_from_path(target)
        if linked is None:
            log.warning("%s links to %s, which is not in the docs", source, target)
            return match.group(0)
        # the notebook's page is one folder deeper than its source file
        url = posixpath.relpath(linked.url or ".", page.url.rstrip("/") or ".")
        if linked.url.endswith("/") or not linked.url:
            url += "/"  # relpath drops the trailing slash of directory URLs
        return f'href="{url}{anchor}"'

    return _HREF.sub(rewrite, html)


def clean_notebook_html(html: str) -> str:
    """Drop nbval markers, stderr streams and nbconvert's MathJax 2 loader from a notebook page."""
    html = _NBVAL_COPY.sub(r"\1", _NBVAL.sub("", html))
    html = _STDERR.sub("", html)
    return _MATHJAX2.sub("", html)


def _download_link(page) -> str:
    name = posixpath.basename(page.file.src_uri)
    return (
        '<p class="notebook-download"><a class="md-button" '
        f'href="{html_lib.escape(name)}" download>Download this notebook ({name})</a></p>\n'
    )


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    html = clean_notebook_html(_rewrite_links(html, page, files))
    return _download_link(page) + html


def on_page_context(context, page, config, nav):
    # docs/tutorials is a symlink to tutorials/: edit the notebook where it lives
    if page.edit_url and page.file.src_uri.endswith(".ipynb"):
        page.edit_url = page.edit_url.replace("/docs/tutorials/", "/tutorials/")
    # a page a script writes (benchmarks, study) is changed by re-running the script, not by hand
    if (page.markdown or "").startswith("<!-- generated by"):
        page.edit_url = None
    return context


# --- API names in the prose link to the reference ---------------------------------------------
def _names_in_all(path: Path) -> list[str]:
    """The names a module lists in ``__all__``, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]
    return []


def _public_definitions(path: Path) -> list[str]:
    """Top-level functions and classes of a module whose names do not start with ``_``."""
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.ClassDef)
    return [n.name for n in tree.body if isinstance(n, kinds) and not n.name.startswith("_")]


def api_identifiers(root: Path = ROOT) -> dict[str, str]:
    """Public name -> the identifier under which the API reference documents it."""
    package = root / "lightning_lowrank"
    found = {name: f"lightning_lowrank.{name}" for name in _names_in_all(package / "__init__.py")}
    # the function `inject` shadows its module in the package namespace: the reference documents
    # it under its module's path
    found["inject"] = "lightning_lowrank.inject.inject"
    # the analysis page documents its whole module, re-exported names included
    for name in _public_definitions(package / "analysis.py"):
        found[name] = f"lightning_lowrank.analysis.{name}"
    for name in _names_in_all(package / "demos" / "__init__.py"):
        found.setdefault(name, f"lightning_lowrank.demos.{name}")
    return found


_FENCE = re.compile(r"^\s*(```|~~~)")
# an existing link ([text](url) or [text][id]): left as it is
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\](?:\([^)]*\)|\[[^\]]*\])")
_CODE = re.compile(r"(?<!`)`([A-Za-z_][A-Za-z0-9_]*)(\(\))?`(?!`)")


def link_api_names(markdown: str, identifiers: dict[str, str]) -> str:
    """Turn `` `name` `` code spans naming a public API object into autorefs cross-references.

    Fenced code, headings, admonition titles and code spans already inside a link are left alone.
    """

    def link(match: re.Match[str]) -> str:
        identifier = identifiers.get(match.group(1))
        return f"[{match.group(0)}][{identifier}]" if identifier else match.group(0)

    def line_links(line: str) -> str:
        out, last = [], 0
        for m in _LINK.finditer(line):
            out.append(_CODE.sub(link, line[last : m.start()]))
            out.append(m.group(0))
            last = m.end()
        out.append(_CODE.sub(link, line[last:]))
        return "".join(out)

    lines, fence = [], None
    for line in markdown.split("\n"):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
        elif not line.lstrip().startswith(("#", "!!!", "???", "::: ")):
            line = line_links(line)
        lines.append(line)
    return "\n".join(lines)


_IDENTIFIERS: dict[str, str] = {}


def on_page_markdown(markdown, page, config, files):
    if "<!-- table: " in markdown:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from benchmarks.choose import fill

        markdown = fill(markdown)
    if page.file.src_uri.startswith("reference/"):
        return markdown  # the reference documents the names; no links to itself
    if not _IDENTIFIERS:
        _IDENTIFIERS.update(api_identifiers())
    return link_api_names(markdown, _IDENTIFIERS)


# --- MathJax, served by the site --------------------------------------------------------------
def mathjax_source() -> Path:
    """The ``es5`` folder of the MathJax copy installed with the docs extra."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(
            "MathJax is not installed: install the docs extra (pip install -e '.[docs]'), which "
            "brings the django-static-mathjax package the site serves MathJax from"
        )
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").exists():
        raise PluginError(f"{es5} has no tex-mml-chtml.js: reinstall django-static-mathjax")
    return es5


def on_config(config):
    mathjax_source()  # fail before building when it is missing
    return config


def on_post_build(config):
    source = mathjax_source()
    target = Path(config["site_dir"]) / "javascripts" / "mathjax"
    for part in MATHJAX_PARTS:
        src, dst = source / part, target / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    licence = source.parent / "LICENSE"
    if licence.exists():
        shutil.copy2(licence, target / "LICENSE")
