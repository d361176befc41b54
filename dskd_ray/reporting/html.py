"""What both HTML pages (the evaluation report and the scoring-run gallery) write the same way:
escaping, relative links and images, the page shell and its base style."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from dskd_ray.errors import DSKDError

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


GENERATOR = '<meta name="generator" content="dskd_ray">'
# How pages written before GENERATOR began: theirs may be replaced too.
_OLDER_PAGES = ("<title>DSKD evaluation report", "<title>Scoring run ")


def page(title: str, css: str, body: list[str]) -> str:
    """A whole self-contained page: `css` inline (after `BASE_CSS`), no external resources."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'{GENERATOR}<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{BASE_CSS}{css}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def prepare_report_dir(directory: str | Path, not_inside: str | None = None) -> Path:
    """The folder a page goes to, checked before any work is done and made: not a file, not
    holding an index.html that dskd did not write (it would be replaced), and not inside
    `not_inside` (a local scores folder: a report is not results). DSKDError in one line."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DSKDError(f"--report {directory} is a file, not a folder: choose a folder")
    index = directory / "index.html"
    if index.is_file():
        head = index.read_bytes()[:4096].decode("utf-8", "replace")
        if GENERATOR not in head and not any(mark in head for mark in _OLDER_PAGES):
            raise DSKDError(
                f"--report {directory} holds an index.html that dskd did not write: "
                "choose another folder (it would be replaced)"
            )
    if not_inside is not None and "://" not in not_inside:
        root = Path(not_inside).resolve()
        here = directory.resolve()
        if here == root or root in here.parents:
            raise DSKDError(
                f"--report {directory} is inside the scores folder {not_inside}: "
                "choose a folder outside it"
            )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DSKDError(f"--report {directory}: cannot make the folder ({e.strerror})") from e
    return directory
