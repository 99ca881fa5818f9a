"""Per-platform badges: a shields.io endpoint JSON (for the README) and a small local SVG (for the offline page)."""

from __future__ import annotations

import unicodedata

from portvlm.publish.table import PlatformSummary

# shields.io named colours, as hex for the local SVG.
COLORS = {
    "brightgreen": "#4c1",
    "green": "#97ca00",
    "yellowgreen": "#a4a61d",
    "yellow": "#dfb317",
    "orange": "#fe7d37",
    "red": "#e05d44",
    "lightgrey": "#9f9f9f",
}


def label(summary: PlatformSummary) -> str:
    return f"portvlm {summary.platform}"


def endpoint(summary: PlatformSummary) -> dict:
    """The shields.io endpoint document (https://shields.io/badges/endpoint-badge)."""
    return {"schemaVersion": 1, "label": label(summary), "message": summary.message, "color": summary.color}


def text_width(text: str) -> int:
    """Approximate rendered width in px of 11px Verdana-like text (deterministic; no font metrics needed)."""
    width = 0.0
    for ch in text:
        if unicodedata.east_asian_width(ch) in ("W", "F"):
            width += 11
        elif ch in "il.,:;|!'· ":
            width += 3.5
        elif ch.isupper() or ch in "mw%@":
            width += 8.5
        else:
            width += 6.6
    return int(round(width))


def svg_geometry(summary: PlatformSummary) -> dict:
    """Sizes and colours the SVG template lays out (two boxes: label | message)."""
    return box_geometry(label(summary), summary.message, summary.color)


def box_geometry(label_text: str, message: str, color: str) -> dict:
    """:func:`svg_geometry` for any label, message and shields.io colour name (the upstream badge)."""
    left = text_width(label_text) + 12
    right = text_width(message) + 12
    return {
        "label": label_text,
        "message": message,
        "left": left,
        "right": right,
        "width": left + right,
        "color": COLORS.get(color, COLORS["lightgrey"]),
    }


UPSTREAM_LABEL = "portvlm newest upstream"


def upstream_endpoint(upstream) -> dict:
    """The shields.io endpoint document of the drift lane's badge (``portvlm.publish.upstream.Upstream``)."""
    return {"schemaVersion": 1, "label": UPSTREAM_LABEL, "message": upstream.message, "color": upstream.color}
