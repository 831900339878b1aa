"""report.html: one self-contained page from a run folder, with every image embedded."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from PIL import Image

from cgan_pipe.cli import main
from cgan_pipe.errors import DataError
from cgan_pipe.report import write_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


@pytest.fixture()
def run_dir(tmp_path, small_shards):
    """A run folder as `cgan-pipe run` leaves it, with small stand-ins for the training outputs."""
    run = tmp_path / "runs" / "demo"
    (run / "samples").mkdir(parents=True)
    (run / "export" / "files").mkdir(parents=True)
    for step in (10, 20, 30):
        Image.new("RGB", (40, 40), (step, 0, 0)).save(run / "samples" / f"step-{step:07d}.png")
    Image.new("RGB", (60, 30), "white").save(run / "curves.png")
    Image.new("RGB", (30, 30), "blue").save(run / "export" / "contact-sheet.png")
    (run / "config.yaml").write_text("name: demo <&>\n")
    summary = {"name": "demo <script>", "steps": 30, "images_per_s": 321.5, "data_wait": 0.02, "loss_d": 1.2,
               "loss_g": 0.8, "checkpoint": str(run / "checkpoints" / "ckpt-0000030.pt"),
               "eval": {"classifier_fd": 12.5, "class_accuracy": 0.4}, "shards": str(small_shards),
               "config": str(run / "config.yaml"), "export_dir": str(run / "export"),
               "export_files": str(run / "export" / "files"), "export_shards": None, "export_images": 100,
               "export_format": "jpeg", "export_quality": 95,
               "stages": {"prepare": {"status": "up to date", "seconds": 0.1},
                          "train": {"status": "ran", "seconds": 60}}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_the_report_embeds_every_image_and_links_only_into_the_run(run_dir):
    path = write_report(run_dir)
    page = path.read_text()
    parsed = _Collect()
    parsed.feed(page)
    assert parsed.headings == ["Results", "Curves", "Samples over training", "Exported images", "Data",
                               "Configuration"]
    assert len(parsed.images) == 1 + 3 + 1 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert parsed.links == ["export/files/"] and (run_dir / parsed.links[0]).is_dir()
    assert "<script>" not in page and "demo &lt;script&gt;" in page and "name: demo &lt;&amp;&gt;" in page
    assert "<th>eval: classifier_fd</th><td>12.5</td>" in page and "<th>samples</th><td>200</td>" in page


def test_the_report_command_rewrites_it_and_a_folder_without_a_run_is_named(run_dir, tmp_path):
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 0 and (run_dir / "report.html").is_file()
    with pytest.raises(DataError, match="no summary.json; run the pipeline first"):
        write_report(tmp_path)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Debian's chromium is not installed here; the page is checked without a browser above")
def test_the_report_renders_its_images_in_headless_chromium(run_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    page = write_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 22) or []}
    assert (0, 0, 255) in colours and (30, 0, 0) in colours  # the contact sheet and the last grid were drawn
