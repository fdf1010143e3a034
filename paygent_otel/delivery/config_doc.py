"""Render the settings table of ``docs/configuration.md`` from :data:`SETTINGS`.

``python -m paygent_otel.delivery.config_doc`` prints it; ``tests/test_config.py`` fails when the
document and the code drift apart.
"""

from __future__ import annotations

from typing import Final

from paygent_otel.delivery.config import SETTINGS

__all__ = ["BEGIN_MARKER", "END_MARKER", "render_table"]

BEGIN_MARKER: Final = "<!-- BEGIN GENERATED: python -m paygent_otel.delivery.config_doc -->"
END_MARKER: Final = "<!-- END GENERATED -->"


def render_table() -> str:
    """The Markdown table of every setting, as :data:`SETTINGS` declares it."""
    lines = [
        BEGIN_MARKER,
        "",
        "| Argument | Environment variable | Type | Default | `serve` flag | Meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        notes = [n for n, on in (("per signal", s.per_signal), ("blocks", s.blocks)) if on]
        env = f"`{s.env}`" + (f" ({', '.join(notes)})" if notes else "")
        argument = f"`{s.name}`" if s.name else ""
        flag = f"`{s.flag}`" if s.flag else ""
        lines.append(f"| {argument} | {env} | {s.kind} | {s.default_doc} | {flag} | {s.doc} |")
    lines += ["", END_MARKER]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_table())
