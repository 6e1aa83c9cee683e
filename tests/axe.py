"""
axe-core in a Playwright page: the dashboard's accessibility checked as a test.

    from axe import axe_violations, format_violations
    violations = axe_violations(page)
    assert not violations, format_violations(violations)

axe-core comes from npm as a test dependency: C{make test} installs it at
L{AXE_JS} (the Makefile's C{AXE}).  It is loaded with C{page.evaluate} (an
evaluated script is not subject to the page's Content-Security-Policy, so
the dashboard's strict CSP stays as it is), then run with the WCAG 2.0,
2.1 and 2.2 A/AA rules and axe's best practices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
#: where `make test` (or `make .venv/axe/node_modules/axe-core/axe.min.js`) puts axe-core
AXE_JS = REPO / ".venv" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
TAGS = ("wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice")

_RUN = """async (tags) => {
  const result = await axe.run(document, {runOnly: {type: "tag", values: tags}, resultTypes: ["violations"]});
  return result.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map(n => ({target: n.target.join(" "), summary: n.failureSummary || "", html: n.html}))
  }));
}"""


def axe_source() -> str:
    """axe-core's script; the test is skipped, saying how to get it, when it is not installed."""
    if not AXE_JS.is_file():
        pytest.skip(f"axe-core is missing at {AXE_JS}: run `make {AXE_JS.relative_to(REPO)}` (make test does)")
    return AXE_JS.read_text(encoding="utf-8")


def axe_violations(page: Any, tags: tuple[str, ...] = TAGS) -> list[dict[str, Any]]:
    """
    The axe-core violations of the page as it is now: a list of C{{"id",
    "impact", "help", "nodes": [{"target", "summary", "html"}]}}.
    """
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(axe_source())
    return page.evaluate(_RUN, list(tags))


def format_violations(violations: list[dict[str, Any]], where: str = "") -> str:
    """One readable block per violation: rule id, impact, what it means, and each element (selector, why)."""
    lines = []
    for v in violations:
        lines.append(f"{where}{v['id']} ({v['impact']}): {v['help']}")
        for n in v["nodes"][:10]:
            summary = " ".join(n["summary"].split())[:300]
            lines.append(f"    {n['target']}: {summary}")
        if len(v["nodes"]) > 10:
            lines.append(f"    ... and {len(v['nodes']) - 10} more")
    return "\n".join(lines)
