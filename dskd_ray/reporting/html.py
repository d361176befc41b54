"""What both HTML pages (the evaluation report and the scoring-run gallery) write the same way:
escaping, relative links and images, the page shell and its base style."""

from __future__ import annotations

import html
from urllib.parse import quote

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
  max-width: 1400px; padding: 0 16px; color: #222; background: #fafafa; }
"""


def escape(text: object) -> str:
    """`text` safe inside HTML text and double-quoted attributes."""
    return html.escape(str(text), quote=True)


def href(path: str) -> str:
    """A relative path as an attribute value: URL-quoted (folders kept), then escaped."""
    return escape(quote(path, safe="/"))


def img(src: str, alt: str, width: int | None = None, height: int | None = None) -> str:
    size = f' width="{width}" height="{height}"' if width and height else ""
    return f'<img src="{href(src)}"{size} alt="{escape(alt)}">'


def page(title: str, css: str, body: list[str]) -> str:
    """A whole self-contained page: `css` inline (after `BASE_CSS`), no external resources."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{BASE_CSS}{css}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
