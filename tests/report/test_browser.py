"""The report renders in a real browser: headless Chromium opens report.html and every figure decodes."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from diffcircuit.cli import main

BROWSER = next(
    (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium on PATH (`make test` installs it where apt-get can)"
)

_CHECK = """<!doctype html><html><body><pre id="log">start</pre><script>
const log = m => { document.getElementById("log").textContent += "\\n" + m; };
const f = document.createElement("iframe");
f.onload = () => {
  const imgs = Array.from(f.contentDocument.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  log("FIGURES " + ok.length + "/" + imgs.length);
  log("HEADINGS " + Array.from(f.contentDocument.querySelectorAll("h2")).map(h => h.textContent).join("|"));
  const d = f.contentDocument;
  const links = Array.from(d.querySelectorAll("nav#contents a"));
  log("CONTENTS " + links.filter(a => d.getElementById(a.getAttribute("href").slice(1))).length + "/" + links.length);
  log("FINDINGS " + d.querySelectorAll("#key-findings + p + ul > li").length);
  const heads = Array.from(d.querySelectorAll("details[id^=head-]"));
  log("HEADS " + heads.length + " " + heads.filter(x => x.querySelectorAll("tr").length > 1).length);
  log("END");
};
f.src = "REPORT";
document.body.appendChild(f);
</script></body></html>"""


def _open(report: Path) -> dict[str, str]:
    """What the page reports after Chromium has loaded ``report`` in a frame: figures decoded / total, headings."""
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "check.html"
        page.write_text(_CHECK.replace("REPORT", report.resolve().as_uri()))
        dom = subprocess.run(
            [
                BROWSER,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--allow-file-access-from-files",
                "--virtual-time-budget=10000",
                f"--user-data-dir={tmp}/profile",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    found = dict(re.findall(r"^(FIGURES|HEADINGS|CONTENTS|FINDINGS|HEADS) (.*)$", dom, flags=re.M))
    assert "FIGURES" in found, f"the check page did not run: {dom[:300]!r}"
    return found


@pytest.fixture(scope="module")
def report(small_model_dir_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "run"
    args = [
        "run",
        "--out",
        str(out),
        "--model",
        str(small_model_dir_module),
        "--n",
        "3",
        "--timesteps",
        "20,800",
        "--batch-size",
        "3",
        "--ablate-n",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    return out / "report.html"


def test_every_figure_of_the_report_renders_in_chromium(report):
    found = _open(report)
    n_figures = len(list((report.parent / "figures").glob("*.png")))
    assert n_figures >= 7 and found["FIGURES"] == f"{n_figures}/{n_figures}"
    for heading in (
        "Key findings",
        "The paper's claims, measured here",
        "Circuits",
        "Attention maps",
        "Head roles",
        "Heads, one by one",
    ):
        assert heading in found["HEADINGS"]


def test_the_contents_key_findings_and_per_head_pages_render(report):
    import pandas as pd

    found = _open(report)
    resolved, links = map(int, found["CONTENTS"].split("/"))
    assert (
        links == found["HEADINGS"].count("|") + 1 and resolved == links
    )  # every section listed, every link lands
    assert int(found["FINDINGS"]) >= 1
    heads = pd.read_parquet(report.parent / "tables" / "head_metrics.parquet")[
        ["layer", "head"]
    ].drop_duplicates()
    pages, with_rows = map(int, found["HEADS"].split())
    assert pages == with_rows == len(heads)  # one page per head, each with its table


def test_a_broken_figure_is_caught(report, tmp_path):
    """The check itself can fail: corrupt one embedded PNG and it must count one figure short."""
    html = report.read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "report.html"
    broken.write_text(html[:start] + "AAAA" + html[start + 40 :])
    n_figures = html.count("data:image/png;base64,")
    assert _open(broken)["FIGURES"] == f"{n_figures - 1}/{n_figures}"
