"""MkDocs hook: make the Markdown links inside tutorial notebooks work on the site.

A notebook links to pages relative to its own folder (``../concepts/lora.md``), which is right in
Jupyter and on GitHub. mkdocs-jupyter renders ``tutorials/01_lora.ipynb`` as
``tutorials/01_lora/index.html`` and leaves links untouched, so they would be one level off and
still end in ``.md``. This hook rewrites them to the built pages' URLs and reports links to pages
that do not exist (a warning, so ``mkdocs build --strict`` fails on them).
"""

from __future__ import annotations

import logging
import posixpath
import re

log = logging.getLogger("mkdocs.hooks.notebook_links")

_HREF = re.compile(r'href="(?!https?:|mailto:|#|/)([^"#]+?\.(?:md|ipynb))(#[^"]*)?"')


def on_page_content(html, page, config, files):
    source = page.file.src_uri
    if not source.endswith(".ipynb"):
        return html
    folder = posixpath.dirname(source)

    def rewrite(match):
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
