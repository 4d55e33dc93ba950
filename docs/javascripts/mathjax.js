// MathJax 3, served by the site itself (mkdocs_hooks.py copies it into javascripts/mathjax/).
// Two sources of math: pymdownx.arithmatex wraps the Markdown pages' \( \) and \[ \] in
// .arithmatex elements; notebook Markdown cells (mkdocs-jupyter) keep $...$ and $$...$$ inside
// .jp-RenderedMarkdown. Everything else (code, outputs, navigation) is left alone.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    // any element with a class is skipped unless it is one of these (or inside one)
    ignoreHtmlClass: "[^ ]+",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown"
  }
};

// instant navigation swaps the page without reloading: typeset each new one
document$.subscribe(() => {
  if (MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
