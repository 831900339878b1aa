"""Property-based fuzzing (hypothesis): config files and `--set` values, manifests, DALI index files and
tar headers of any shape give a result or the project's one error type, never a traceback or a hang."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgan_pipe.config import PipelineConfig, load_pipeline
from cgan_pipe.schema import describe_keys
from cgan_pipe.data.manifest import parse_dali_index, parse_manifest
from cgan_pipe.data.tars import iter_members
from cgan_pipe.errors import ConfigError, DataError

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
KEYS = [doc.key for doc in describe_keys(PipelineConfig)]
SECTIONS = sorted({key.split(".")[0] for key in KEYS if "." in key})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
names = st.one_of(st.sampled_from(KEYS + SECTIONS + ["name", "data"]), st.text(max_size=12))


def _load(text: str, overrides: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(text)
        try:
            load_pipeline(path, list(overrides))
        except ConfigError:
            pass


@FUZZ
@given(st.sampled_from(KEYS), st.text(max_size=30))
def test_any_set_value_for_a_known_key_loads_or_is_a_config_error(key, text):
    _load("name: x\ndata: {source: a.tar}\n", [f"{key}={text}"])


@FUZZ
@given(st.sampled_from(KEYS), values)
def test_any_yaml_value_set_on_a_known_key_loads_or_is_a_config_error(key, value):
    flow = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    _load("name: x\ndata: {source: a.tar}\n", [f"{key}={flow}"])


@FUZZ
@given(st.text(max_size=40))
def test_any_set_argument_loads_or_is_a_config_error(item):
    _load("name: x\ndata: {source: a.tar}\n", [item])


@FUZZ
@given(st.dictionaries(names, values, max_size=6))
def test_a_pipeline_file_of_any_shape_loads_or_is_a_config_error(document):
    _load(yaml.safe_dump({"name": "x", "data": {"source": "a.tar"}, **document}))


@FUZZ
@given(st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(names, values, max_size=4), max_size=4))
def test_sections_of_any_shape_load_or_are_a_config_error(sections):
    _load(yaml.safe_dump({"name": "x", "data": {"source": "a.tar"}, **sections}))


@FUZZ
@given(st.text(max_size=200))
def test_any_text_as_a_pipeline_file_loads_or_is_a_config_error(text):
    _load(text)


VALID_MANIFEST = {
    "created_by": "prepare", "source": "a.tar", "settings": {}, "resolution": 32, "image_format": "jpeg",
    "class_names": ["cat"], "shards": [{"tar": "shard-000000.tar", "index": "shard-000000.idx", "samples": 3,
                                        "bytes": 10240, "sha256": "0" * 64}],
    "class_histogram": {"cat": 3}, "quality_histogram": {"95": 3}, "skipped": [], "format_version": 1,
}
MANIFEST_FIELDS = sorted(VALID_MANIFEST)
SHARD_FIELDS = sorted(VALID_MANIFEST["shards"][0])


@FUZZ
@given(st.dictionaries(st.sampled_from(MANIFEST_FIELDS), values, max_size=5),
       st.dictionaries(st.sampled_from(SHARD_FIELDS), values, max_size=3))
def test_a_manifest_with_fields_of_any_type_parses_or_is_a_data_error(fields, shard_fields):
    manifest = {**VALID_MANIFEST, **fields}
    if isinstance(manifest.get("shards"), list) and shard_fields:
        manifest["shards"] = [{**VALID_MANIFEST["shards"][0], **shard_fields}]
    try:
        parsed = parse_manifest(json.dumps(manifest), "manifest.json")
    except DataError:
        return
    assert parsed.num_samples >= 0 and all(isinstance(s.tar, str) for s in parsed.shards)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_as_a_manifest_parses_or_is_a_data_error(text):
    try:
        parse_manifest(text, "manifest.json")
    except DataError:
        pass


@FUZZ
@given(st.lists(st.lists(st.one_of(st.text(max_size=8), st.integers(-5, 10**6).map(str)), max_size=9), max_size=5))
def test_a_dali_index_of_any_shape_parses_or_is_a_data_error(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000000.idx"
        path.write_text("v1.2 3\n" + "\n".join(" ".join(fields) for fields in lines) + "\n")
        try:
            for files in parse_dali_index(path):
                assert all(entry.offset >= 0 and entry.size >= 0 for entry in files)
        except DataError:
            pass


@FUZZ
@given(st.binary(max_size=3000), st.data())
def test_a_damaged_tar_lists_or_is_a_data_error(noise, data):
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "real.tar"
        with tarfile.open(real, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(3):
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = 700
                tar.addfile(info, io.BytesIO(bytes(700)))
        blob = bytearray(real.read_bytes())
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at + len(noise)] = noise  # overwrite (and maybe cut or extend) from a random offset
        damaged = Path(tmp) / "damaged.tar"
        damaged.write_bytes(bytes(blob))
        try:
            for entry in iter_members(damaged):
                assert entry.offset >= 0 and entry.size >= 0
        except DataError:
            pass
