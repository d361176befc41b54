"""The HTML report: its charts and thumbnail choice, the page's links, and a real browser loading it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_textures
from dskd_ray.evaluation import metrics
from dskd_ray.evaluation.evaluate import CategoryResult, summarize
from dskd_ray.evaluation.report import select_thumbnails, write_report
from dskd_ray.reporting.charts import nice_ticks

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "bench" / "check_report.sh"
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary installed (apt-get install -y chromium); "
    "bench/check_report.sh DIR runs the same check wherever there is one",
)
ODD_NAME = "odd <b>&\"name'"  # must reach the page escaped, and its file must still load


class _Links(HTMLParser):
    """Collects img src and a href values, and the page's visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"] or "")
        if tag == "a":
            self.links.append(a["href"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_report(directory: Path) -> _Links:
    """Parse DIR/index.html and check every image it shows is a local file beside it that decodes."""
    from urllib.parse import unquote, urlsplit

    page = (directory / "index.html").read_text(encoding="utf-8")
    parsed = _Links()
    parsed.feed(page)
    assert parsed.images, "the report shows no images"
    for src in parsed.images + [h for h in parsed.links if not h.startswith("#")]:
        url = urlsplit(src)
        assert not url.scheme and not url.netloc and not src.startswith("/"), src
        path = directory / unquote(url.path)
        assert path.is_file(), f"missing {src}"
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and img.width > 0
    assert "http://" not in page and "https://" not in page
    return parsed


# ----------------------------------------------------------------------------- pieces


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = nice_ticks(0.013, 0.29)
    assert ticks[0] >= 0.013 and ticks[-1] <= 0.29 and 3 <= len(ticks) <= 7
    assert nice_ticks(2.0, 2.0) == [2.0]


def test_thumbnails_put_the_worst_calls_first() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.4, 0.95, 0.05, 0.6])
    fp, fn, rest = select_thumbnails(labels, scores, n_worst=2, n_sample=3, threshold=0.45)
    assert fp.indices == [1, 2]  # normal, highest scores first
    assert fn.indices == [4, 6]  # anomalous, lowest scores first
    assert "2 of these 2 are above the threshold" in fp.note
    assert "2 of these 2 are at or below it" in fn.note
    assert len(rest.indices) == 3
    assert not set(rest.indices) & set(fp.indices + fn.indices)
    assert list(scores[rest.indices]) == sorted(scores[rest.indices], reverse=True)


def _result(
    folder: Path, name: str = ODD_NAME, with_masks: bool = True, n: int = 12, size: int = 32
) -> CategoryResult:
    """A CategoryResult as evaluate_category(keep_maps=True) gives, with images on disk."""
    rng = np.random.default_rng(0)
    paths = write_textures(folder, n, size=size)
    odd = folder / f"{ODD_NAME}.png"
    paths[-1].rename(odd)
    paths[-1] = odd
    labels = np.array([i % 2 for i in range(n)])
    masks = np.zeros((n, size, size), bool)
    masks[labels == 1, 8:16, 10:20] = True
    maps = rng.random((n, size, size)).astype(np.float32) * 0.5 + masks * rng.random((n, 1, 1))
    scores = maps.reshape(n, -1).max(1).astype(np.float64)
    if not with_masks:
        masks[:] = False
    return CategoryResult(
        name=name,
        image_auroc=metrics.image_auroc(labels, scores),
        pixel_auroc=metrics.pixel_auroc(masks, maps) if with_masks else None,
        aupro=metrics.aupro(masks, maps) if with_masks else None,
        f1_max=metrics.f1_max(labels, scores),
        n_test=n,
        n_anomalous=int(labels.sum()),
        scores=scores,
        labels=labels,
        paths=[str(p) for p in paths],
        defect_types=["good" if y == 0 else "scratch" for y in labels],
        maps=maps,
        masks=masks,
    )


def test_report_page_links_only_local_images_and_escapes_names(tmp_path: Path) -> None:
    results = [_result(tmp_path / "a"), _result(tmp_path / "b", name="plain", with_masks=False)]
    index = write_report(results, tmp_path / "report", thresholds=[0.6, None])
    assert index == tmp_path / "report" / "index.html"
    parsed = parse_report(tmp_path / "report")
    page = index.read_text(encoding="utf-8")
    text = "".join(parsed.text)

    assert ODD_NAME not in page  # never raw in the HTML source
    assert "odd &lt;b&gt;&amp;&quot;name&#x27;" in page
    assert ODD_NAME in text  # the parser sees the real name: category heading and caption
    assert f"{ODD_NAME}.png" in text

    # Metrics table: a row per category and the mean, as summarize gives them.
    table = summarize(results)
    assert f"{table[ODD_NAME]['image_auroc']:.3f}" in text and "mean" in text
    # Curves: both categories have a ROC curve; only the one with masks has a PRO curve.
    images = set(parsed.images)
    assert {"00_odd_b_name/roc.png", "00_odd_b_name/pro.png", "01_plain/roc.png"} <= images
    assert "01_plain/pro.png" not in images and "PRO curve omitted" in text
    # Captions: threshold verdicts where there is a threshold, a plain note where not.
    assert "false positive" in text or "false negative" in text or "flagged anomalous" in text
    assert "no threshold in the checkpoint" in text
    # Thumbnails are the two panels at the input size; every test image here is shown.
    thumbs = [s for s in images if s.split("/")[-1][0].isdigit() and "/" in s]
    assert len(thumbs) == 24
    with Image.open(tmp_path / "report" / thumbs[0]) as img:
        assert img.size == (2 * 32 + 4, 32)


def test_report_needs_the_maps(tmp_path: Path) -> None:
    result = _result(tmp_path / "a")
    result.maps = None
    with pytest.raises(ValueError, match="keep_maps=True"):
        write_report([result], tmp_path / "report")


def test_one_class_test_set_omits_the_roc_curve(tmp_path: Path) -> None:
    result = _result(tmp_path / "a", with_masks=False)
    result.labels = np.zeros_like(result.labels)
    result.image_auroc = result.f1_max = None
    write_report([result], tmp_path / "report")
    text = "".join(parse_report(tmp_path / "report").text)
    assert "ROC curve omitted" in text and "PRO curve omitted" in text


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained in-process, then `dskd evaluate --report` as a user runs it, on a
    tiny MVTec-layout category with masks."""
    from dskd_ray.config import DSKDConfig
    from dskd_ray.training.loop import train

    root = tmp_path_factory.mktemp("cli_report")
    cat = root / "data" / "tex"
    write_textures(cat / "train" / "good", 8)
    write_textures(cat / "test" / "good", 3, seed=5)
    bad = write_textures(cat / "test" / "spot", 3, seed=6)
    (cat / "ground_truth" / "spot").mkdir(parents=True)
    for p in bad:
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (20, 20, 34, 30))
        mask.save(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        img = Image.open(p).convert("RGB")
        img.paste((0, 0, 0), (20, 20, 34, 30))
        img.save(p)
    model = root / "m.pt"
    config = DSKDConfig(
        backbone="resnet18", teacher_weights="random", image_size=64, epochs=1, batch_size=4
    )
    train(config, str(cat), str(model), device="cpu")
    report = root / "report"
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "evaluate", str(cat), "--model", str(model)]
        + ["--report", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"report: {report / 'index.html'}" in result.stdout
    return report


def test_evaluate_writes_a_report(cli_report: Path) -> None:
    parsed = parse_report(cli_report)
    text = "".join(parsed.text)
    assert "Worst false positives" in text and "Worst false negatives" in text
    assert {"00_tex/roc.png", "00_tex/pro.png", "00_tex/scores.png"} <= set(parsed.images)
    assert sum(1 for s in parsed.images if s.startswith("00_tex/0")) == 6  # every test image
    assert "spot (anomalous)" in text and "good (normal)" in text


@needs_chromium
def test_report_loads_in_headless_chromium(cli_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT), str(cli_report), str(shot)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK images=")
    assert int(result.stdout.split("images=")[1].split()[0]) == len(parse_report(cli_report).images)
    with Image.open(shot) as img:
        assert img.width > 0 and len(img.getcolors(1 << 20) or range(1000)) > 50  # not blank


@needs_chromium
def test_browser_check_catches_a_missing_image(cli_report: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(cli_report, broken)
    (broken / "00_tex" / "roc.png").unlink()
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT), str(broken)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "00_tex/roc.png" in result.stdout


# ----------------------------------------------------------------------------- the demo's report


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`dskd demo` as a new user runs it, on small demo data (64², a handful of images per
    category) and the memory alone, so it runs in seconds: (its folder, its stdout)."""
    from dskd_ray.demo.data import make_demo_data

    root = tmp_path_factory.mktemp("demo-run")
    make_demo_data(root / "data", n_train=8, n_test_good=2, n_test_defect_per_type=1, image_size=64)
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "demo", "--dir", str(root), "--epochs", "1",
         "--image-size", "64", "--students", "none", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_the_demo_ends_with_its_report_and_the_report_has_every_category(
    demo_run: tuple[Path, str],
) -> None:
    from dskd_ray.demo.data import DEMO_CATEGORIES

    root, stdout = demo_run
    assert stdout.strip().splitlines()[-1].startswith(f"report:  {root / 'report' / 'index.html'}")
    parsed = parse_report(root / "report")
    text = "".join(parsed.text)
    for i, category in enumerate(sorted(DEMO_CATEGORIES)):
        assert category in text
        assert f"{i:02d}_{category}/roc.png" in parsed.images


@needs_chromium
def test_the_demo_report_loads_in_headless_chromium(demo_run: tuple[Path, str]) -> None:
    root, _ = demo_run
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT), str(root / "report")], capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK images=")
