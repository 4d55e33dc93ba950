"""Read the built site in headless Chromium, as a visitor would, and report what is broken.

``python -m tests.browser_check site`` serves ``site/`` on a loopback port, opens every page in one
headless Chromium (driven over the DevTools protocol on a pipe: no extra packages), waits until
MathJax has typeset it, and reports:

- raw TeX left in the visible text (``\\(...\\)``, ``$x^2$``, ``\\frac{...}``: math MathJax did not
  typeset), and TeX errors MathJax rendered (``mjx-merror``);
- a display equation wider than the text column that does not scroll in its own box, and a page
  wider than the window (at Chromium's headless default of 800 pixels);
- internal links (``<a href>``, ``<img src>``) to a file that does not exist or an anchor that is
  not on the target page;
- anything a page requests from another host (MathJax, fonts: the site must work offline). The
  browser is kept off the network: such requests are recorded and fail.

Exit status 1 lists the problems; without a Chromium the check prints why it is skipped and exits
0 (``make browser-check`` installs Debian's ``chromium`` first). ``--screenshot PAGE=FILE.png``
(repeatable) also saves a screenshot of a page, taken by ``chromium --headless --screenshot``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    # nothing leaves the machine: no background services, every host but loopback unresolvable,
    # and any other request sent to a closed local port (loopback itself bypasses the proxy)
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
)
# requests to other hosts that are expected and harmless offline: Material's header asks GitHub
# for the repository's star and fork counts, and shows the link without them when that fails
ALLOWED_HOSTS = {"api.github.com"}

# TeX that MathJax should have turned into math: delimiters, a $...$ with TeX inside, a \command{
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^$\s][^$\n]*[\\^_{}][^$\n]*\$|\\[A-Za-z]+\{")

# Runs in the page: waits for MathJax, then returns the visible text that may hold TeX (outside
# code, outputs and typeset math), the TeX errors, the links and the element ids.
PROBE = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (let i = 0; i < 3; i++) {
    await sleep(50);
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      await MathJax.startup.promise;
    }
  }
  const skip = new Set(["CODE", "PRE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER"]);
  const root = document.querySelector("article") || document.body;
  const texts = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    let hidden = false;
    for (let e = node.parentElement; e && e !== root.parentElement; e = e.parentElement) {
      if (skip.has(e.tagName) || e.hidden || e.classList.contains("clipboard-copy-txt")) {
        hidden = true;
        break;
      }
    }
    const text = node.textContent;
    if (!hidden && (text.includes("\\") || text.includes("$"))) texts.push(text);
  }
  // a display equation wider than the column must scroll inside its own box
  const wide = [], scrolls = [];
  for (const e of root.querySelectorAll('div.arithmatex, mjx-container[display="true"]')) {
    if (e.parentElement.matches("div.arithmatex")) continue;  // the div is the scrolling box
    const overflow = getComputedStyle(e).overflowX;
    if (e.scrollWidth > e.clientWidth + 1) {
      (overflow !== "auto" && overflow !== "scroll" ? wide : scrolls).push(
        `${e.textContent.slice(0, 40)} (${e.scrollWidth - e.clientWidth} px too wide)`);
    }
  }
  const links = [];
  for (const a of document.querySelectorAll("a[href]")) links.push(a.href);
  for (const img of document.querySelectorAll("img[src]")) links.push(img.src);
  return {
    texts,
    errors: Array.from(document.querySelectorAll("mjx-merror"), e => e.textContent),
    math: document.querySelectorAll("mjx-container").length,
    wide,
    scrolls,
    sideways: document.documentElement.scrollWidth > window.innerWidth + 1,
    links,
    ids: Array.from(document.querySelectorAll("[id], a[name]"), e => e.id || e.name),
  };
})()
"""


#: the window width the pages are read at (CSS pixels)
WIDTH = 1280


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def raw_tex(texts: list[str]) -> list[str]:
    """The snippets of ``texts`` that look like TeX no one typeset (40 characters around each)."""
    found = []
    for text in texts:
        for m in RAW_TEX.finditer(text):
            found.append(text[max(0, m.start() - 20) : m.end() + 20].strip())
    return found


def external_requests(urls: list[str], origin: str) -> list[str]:
    """The requested URLs that are not on ``origin`` (nor inline data, nor an allowed host)."""
    found = []
    for url in urls:
        parts = urlsplit(url)
        if (
            parts.scheme in ("data", "blob", "about")
            or f"{parts.scheme}://{parts.netloc}" == origin
        ):
            continue
        if parts.hostname not in ALLOWED_HOSTS:
            found.append(url)
    return sorted(set(found))


def site_pages(site: Path) -> list[str]:
    """Every HTML page of a built site, as URL paths (``/concepts/lora/index.html``)."""
    skip = {"404.html"}
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site).as_posix()
        if path.name in skip or rel.startswith("javascripts/") or rel.startswith("assets/"):
            continue
        pages.append("/" + rel)
    return pages


def target_file(site: Path, path: str) -> Path | None:
    """The file a URL path serves (a directory serves its ``index.html``), or None."""
    local = site / unquote(path).lstrip("/")
    if local.is_dir():
        local = local / "index.html"
    return local if local.is_file() else None


def canonical(path: str) -> str:
    """A URL path as the page key used by ``site_pages`` (``/a/`` -> ``/a/index.html``)."""
    path = unquote(path)
    return path + "index.html" if path.endswith("/") else path


@dataclass
class Report:
    """What the check found: ``problems`` (page -> messages) and how much it looked at."""

    pages: int = 0
    links: int = 0
    math: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, page: str, message: str) -> None:
        self.problems.setdefault(page, []).append(message)


def check_links(site: Path, origin: str, found: dict[str, dict[str, Any]], report: Report) -> None:
    """Every internal link of every visited page must reach a file, and its anchor an id there."""
    for page, probe in found.items():
        for link in probe["links"]:
            parts = urlsplit(link)
            if f"{parts.scheme}://{parts.netloc}" != origin:
                continue  # another host: not this site's to check
            report.links += 1
            if target_file(site, parts.path) is None:
                report.add(page, f"broken link: {parts.path}")
                continue
            anchor = unquote(parts.fragment)
            target = found.get(canonical(parts.path))
            if anchor and target is not None and anchor not in target["ids"]:
                report.add(page, f"missing anchor: {parts.path}#{anchor}")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free loopback port; yields the origin (``http://127.0.0.1:PORT``)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Browser:
    """One headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, chromium: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="browser-check-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def pipes() -> None:  # in the child: Chromium reads fd 3 and writes fd 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            preexec_fn=pipes,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        self.requests: list[str] = []  # URLs requested since the last open()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        # a desktop reader's window: display equations must fit its column without scrolling
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=WIDTH,
            height=1400,
            deviceScaleFactor=1,
            mobile=False,
        )
        # the search index (megabytes, indexed again by a worker on every page) is not what is
        # checked here, and on two cores it would dominate the check's time
        self.call("Network.enable", session=True)
        self.call("Network.setBlockedURLs", session=True, urls=["*/search/search_index.json"])

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        if message.get("method") == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])
        return message

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        """Navigate and wait until the document is parsed (its scripts ran; images may load on)."""
        self.requests = []
        self._id += 1
        message = {
            "id": self._id,
            "method": "Page.navigate",
            "params": {"url": url},
            "sessionId": self.session,
        }
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._id and "error" in reply:
                raise RuntimeError(f"{url}: {reply['error']}")
            if reply.get("method") == "Page.domContentEventFired":
                return

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        result = self.call(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._write)
        os.close(self._read)
        self._profile.cleanup()


def check_site(site: Path, chromium: str, pages: list[str] | None = None) -> Report:
    """Open every page (or ``pages``) of a built site and report raw TeX and broken links."""
    report = Report()
    found: dict[str, dict[str, Any]] = {}
    with serve(site) as origin:
        browser = Browser(chromium)
        try:
            for page in pages or site_pages(site):
                browser.open(origin + page)
                probe = browser.evaluate(PROBE)
                found[page] = probe
                report.pages += 1
                report.math += probe["math"]
                for snippet in raw_tex(probe["texts"]):
                    report.add(page, f"raw TeX: {snippet!r}")
                for error in probe["errors"]:
                    report.add(page, f"TeX error: {error!r}")
                for equation in probe["wide"]:
                    report.add(page, f"wide equation does not scroll: {equation!r}")
                for equation in probe["scrolls"]:
                    report.add(
                        page,
                        f"equation wider than the {WIDTH} px window's column (break it into "
                        f"lines): {equation!r}",
                    )
                if probe["sideways"]:
                    report.add(page, "the page is wider than the window")
                for url in external_requests(browser.requests, origin):
                    report.add(page, f"loads from another host: {url}")
        finally:
            browser.close()
        check_links(site, origin, found, report)
    return report


def screenshot(site: Path, chromium: str, page: str, out: Path, size: str = "1280,1400") -> None:
    """Save a PNG of one page, as ``chromium --headless --screenshot`` renders it."""
    with serve(site) as origin, tempfile.TemporaryDirectory(prefix="browser-shot-") as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=8000",  # lets MathJax typeset before the shot
                f"--screenshot={out.resolve()}",
                origin + page,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build --site-dir)")
    parser.add_argument("--page", action="append", help="check only these URL paths")
    parser.add_argument(
        "--screenshot", action="append", default=[], metavar="PAGE=FILE", help="save a PNG"
    )
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("browser check skipped: no Chromium found (Debian: apt-get install chromium)")
        return 0
    if not (args.site / "index.html").exists():
        print(f"{args.site} has no index.html: build the site first (make docs)")
        return 1
    report = check_site(args.site, chromium, args.page)
    for item in args.screenshot:
        page, _, out = item.partition("=")
        screenshot(args.site, chromium, page, Path(out))
        print(f"screenshot of {page}: {out}")
    for page, messages in sorted(report.problems.items()):
        for message in messages:
            print(f"{page}: {message}")
    problems = sum(len(m) for m in report.problems.values())
    print(
        f"browser check: {report.pages} pages, {report.math} typeset formulas, "
        f"{report.links} internal links, {problems} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
