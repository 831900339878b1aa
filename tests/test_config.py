"""Config loading: validation, overrides, environment expansion, error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgan_pipe.config import (PipelineConfig, config_from_dict, load_pipeline, parse_byte_size, reference_markdown,
                              to_dict)
from cgan_pipe.schema import describe_keys
from cgan_pipe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_cifar_pipeline_loads_with_its_documented_values():
    cfg = load_pipeline(ROOT / "pipelines" / "cifar.yaml")
    assert cfg.name == "cifar"
    assert cfg.data.resolution == 32 and cfg.data.format == "jpeg"
    assert cfg.loader.backend == "dali"
    assert cfg.run_path == Path("runs/cifar")


def test_the_compression_pipelines_load_with_their_modes():
    quality = load_pipeline(ROOT / "pipelines" / "cifar-quality.yaml")
    assert quality.compression.mode == "condition" and quality.data.qualities == [10, 30, 50, 75, 95]
    assert "quality" in quality.eval.metrics
    ambient = load_pipeline(ROOT / "pipelines" / "cifar-ambient.yaml")
    assert ambient.compression.mode == "ambient" and ambient.loader.jpeg_distort == [10, 40]


@pytest.mark.parametrize("key, value, message", [
    ("loader.jpeg_distort", "[0, 40]", r"loader.jpeg_distort: must be \[lo, hi\] with 1 <= lo <= hi <= 100"),
    ("loader.jpeg_distort", "[50, 40]", r"loader.jpeg_distort: must be \[lo, hi\]"),
    ("compression.mode", "clean", r"compression.mode: must be one of none, condition, ambient"),
    ("export.quality_cond", "101", r"export.quality_cond: must be between 1 and 100"),
    ("eval.quality_levels", "[10, 200]", r"eval.quality_levels: every quality must be between 1 and 100"),
])
def test_bad_compression_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(ROOT / "pipelines" / "cifar-quality.yaml", [f"{key}={value}"])


def test_asking_for_a_quality_without_quality_conditioning_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"--set export.quality_cond: asks for a JPEG quality, which only a "
                                          r"model trained with compression.mode: condition can give \(it is 'none'\)"):
        load_pipeline(ROOT / "pipelines" / "cifar.yaml", ["export.quality_cond=10"])


def test_set_overrides_are_typed_and_win(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar}\n")
    cfg = load_pipeline(path, ["train.steps=300", "loader.backend=torch", "train.lr_g=1e-3",
                               "export.classes=[cat, dog]"])
    assert cfg.train.steps == 300 and isinstance(cfg.train.steps, int)
    assert cfg.loader.backend == "torch"
    assert cfg.train.lr_g == pytest.approx(1e-3)
    assert cfg.export.classes == ["cat", "dog"]


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "name: x\ndata:\n  source: a.tar\n  resolutoin: 64\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    message = str(err.value)
    assert f"{path}:4: data.resolutoin" in message
    assert "did you mean 'resolution'" in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar}\ntrain:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"p.yaml:4: train.steps: expected int, got str 'many'"):
        load_pipeline(path)


def test_bool_is_not_accepted_as_int(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar}\ntrain: {batch_size: true}\n")
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        load_pipeline(path)


def test_range_checks(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar, resolution: 48}\n")
    with pytest.raises(ConfigError, match="data.resolution: must be a power of two"):
        load_pipeline(path)
    with pytest.raises(ConfigError, match="--set export.quality: must be between 1 and 100"):
        load_pipeline(write(tmp_path, "name: x\ndata: {source: a.tar}\n"), ["export.quality=101"])


def test_choice_lists_allowed_values(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar}\n")
    with pytest.raises(ConfigError, match="--set loader.backend: must be one of dali, torch"):
        load_pipeline(path, ["loader.backend=ffcv"])


def test_unknown_set_key_is_rejected_with_suggestion(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar}\n")
    with pytest.raises(ConfigError, match=r"--set train.stepz: unknown key 'stepz' \(did you mean 'steps'\?\)"):
        load_pipeline(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_pipeline(path, ["train.steps"])


def test_missing_required_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data.source'"):
        load_pipeline(write(tmp_path, "name: x\n"))
    with pytest.raises(ConfigError, match="nope.yaml: pipeline file not found"):
        load_pipeline(tmp_path / "nope.yaml")


def test_invalid_yaml_reports_line(tmp_path):
    with pytest.raises(ConfigError, match=r"p.yaml:3: invalid YAML"):
        load_pipeline(write(tmp_path, "name: x\ndata:\n\tsource: a.tar\n"))


@pytest.mark.parametrize("text, message", [
    ("name: x\ndata: {source: a.tar}\ntrain:\n  steps: 3\ntrain:\n  batch_size: 8\n",
     r"p.yaml:5: train: given twice \(also at line 3\), and only the last would count; keep one"),
    ("name: x\ndata: {source: a.tar}\ntrain:\n  steps: 3\n  lr_g: 0.1\n  steps: 30\n",
     r"p.yaml:6: train.steps: given twice \(also at line 4\)"),
    ("name: x\ndata: {source: a.tar, source: b.tar}\n", r"p.yaml:2: data.source: given twice"),
])
def test_a_key_given_twice_is_an_error_not_a_silent_choice(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write(tmp_path, text))


def test_yaml_aliases_that_expand_past_any_pipeline_are_refused(tmp_path):
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(9)]
    bomb = "name: x\ndata: {source: a.tar}\nloader:\n  " + "\n  ".join(levels) + "\n"  # 9 ** 10 values
    with pytest.raises(ConfigError, match=r"p.yaml:\d+: loader.\w: over 10,000 values once its aliases are expanded"):
        load_pipeline(write(tmp_path, bomb))
    with pytest.raises(ConfigError, match=r"--set train.steps.*over 10,000 values"):
        load_pipeline(write(tmp_path, "name: x\ndata: {source: a.tar}\n"),
                      ["train.steps=" + "{" + ", ".join(level.replace(": ", ": ", 1) for level in levels) + "}"])
    with pytest.raises(ConfigError, match=r"p.yaml:3: loader: an alias refers to itself"):
        load_pipeline(write(tmp_path, "name: x\ndata: {source: a.tar}\nloader: &l [*l]\n"))
    merged = "name: x\ndata: {source: a.tar}\nbase: &b {steps: 3, batch_size: 8}\n"  # ordinary aliases still work
    cfg = load_pipeline(write(tmp_path, merged.replace("base: &b", "train: &b") + "export: {seed: 2}\n"))
    assert cfg.train.steps == 3


@pytest.mark.parametrize("name", ["../../w/ESCAPED", "a/b", "..", ".", "c:\\x"])
def test_a_name_that_would_leave_runs_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=r"name: must be a plain folder name \(the run folder is runs/<name>\)"):
        load_pipeline(write(tmp_path, f"name: '{name}'\ndata: {{source: a.tar}}\n"))


def test_environment_variables_expand_with_defaults(tmp_path, monkeypatch):
    path = write(tmp_path, "name: x\ndata:\n  source: ${MY_DATA:-fallback.tar}\n")
    monkeypatch.delenv("MY_DATA", raising=False)
    assert load_pipeline(path).data.source == "fallback.tar"
    monkeypatch.setenv("MY_DATA", "/data/mine.tar")
    assert load_pipeline(path).data.source == "/data/mine.tar"
    bare = write(tmp_path, "name: x\ndata:\n  source: ${NOT_SET_ANYWHERE}\n")
    with pytest.raises(ConfigError, match="data.source: environment variable NOT_SET_ANYWHERE is not set"):
        load_pipeline(bare)


def test_round_trip_through_plain_dict():
    cfg = load_pipeline(ROOT / "pipelines" / "cifar.yaml", ["train.steps=7"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg and isinstance(again, PipelineConfig)


def test_every_key_has_help():
    rows = describe_keys(PipelineConfig)
    assert {"data.source", "loader.backend", "loader.device", "train.steps", "export.quality"} <= {r.key for r in rows}
    assert all(r.help for r in rows)
    assert [r.key for r in rows if r.required] == ["name", "data.source"]


def test_config_reference_in_docs_is_current():
    documented = (ROOT / "docs" / "config.md").read_text()
    assert documented == reference_markdown(), (
        "docs/config.md is out of date with cgan_pipe/config.py; regenerate it with the command at its top")


@pytest.mark.parametrize("text,size", [("500000", 500_000), ("256MB", 256 * 10**6), ("1GiB", 2**30),
                                       ("1.5 kb", 1500), ("64KiB", 65536)])
def test_byte_sizes_parse(text, size):
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "12 parsecs", "-5MB", "0"])
def test_bad_byte_sizes_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_byte_size(text)


def test_export_classes_take_names_or_counts_and_counts_must_agree_with_n(tmp_path):
    path = write(tmp_path, "name: x\ndata: {source: a.tar}\nexport:\n  classes: {cat: 3, dog: 2}\n")
    assert load_pipeline(path).export.classes == {"cat": 3, "dog": 2}
    assert load_pipeline(path, ["export.classes=[cat, dog]"]).export.classes == ["cat", "dog"]
    assert load_pipeline(path, ["export.n=5"]).export.n == 5
    with pytest.raises(ConfigError, match=r"--set export.n: 4 images, but the counts in export.classes add up to 5"):
        load_pipeline(path, ["export.n=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {source: a.tar}\nexport:\n  classes: {cat: many}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: export.classes.cat: expected int, got str 'many'"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match=r"--set export.classes: expected list\[str\] \| mapping\[str, int\] \| "
                                          r"null, got str 'cat'"):
        load_pipeline(path, ["export.classes=cat"])
    with pytest.raises(ConfigError, match="export.classes: every count must be > 0"):
        load_pipeline(path, ["export.classes={cat: 0}"])
    with pytest.raises(ConfigError, match="export.truncation: must be at least 0.05"):
        load_pipeline(path, ["export.truncation=0.01"])
    with pytest.raises(ConfigError, match="export.output: must be one of files, shards, both"):
        load_pipeline(path, ["export.output=cloud"])
