"""The first GPU contact's plan, as far as it needs no device: each call's carry fits beside the tree, the pieces
join into the DALI set that imports from where it was unpacked, the phases' order, records written the moment
each step ends, the time limit, and the carried packages first on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from cgan_pipe.data.digest import file_sha256

from conftest import ROOT, cifar_members, write_tar

sys.path.insert(0, str(ROOT / "benchmarks"))
import first_contact  # noqa: E402
import first_contact_pack  # noqa: E402

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The three call folders for this interpreter's Python, packed from this environment."""
    folder = tmp_path_factory.mktemp("first-contact")
    data = write_tar(folder / "test.tar", cifar_members("test", 30))
    manifest = first_contact_pack.pack(folder / "pack", data, PYTHON, 60 * 2**20)
    return folder / "pack", manifest


def test_each_call_carries_at_most_60_mib_with_the_tree(packed):
    pack, manifest = packed
    tree = first_contact_pack.tree_bytes()
    assert manifest["tree_bytes"] == tree > 0
    sizes = {call: first_contact_pack.folder_bytes(pack / f"call-{call}") + tree for call in "abc"}
    assert all(size <= 60 * 2**20 for size in sizes.values()), sizes
    assert sizes["a"] > 50 * 2**20  # call A is filled with the first DALI piece, not left half empty
    assert sorted(p.name for p in (pack / "call-a").iterdir()) == ["dali.tar.xz.00", "data.tar.gz", "manifest.json",
                                                                   "site.tar.xz"]


def test_the_pieces_join_into_a_dali_set_that_imports_from_where_it_was_unpacked(packed, tmp_path):
    pack, manifest = packed
    joined = tmp_path / "dali.tar.xz"
    joined.write_bytes(b"".join((pack / piece).read_bytes() for piece in manifest["dali"]["pieces"]))
    assert file_sha256(joined) == manifest["dali"]["sha256"]
    site = tmp_path / "site"
    first_contact.unpack(joined, site)
    first_contact.unpack(pack / "call-a" / "site.tar.xz", site)
    tag = PYTHON.replace(".", "")
    modules = {p.name for p in (site / "nvidia" / "dali").glob("backend_impl.*.so")}
    assert modules == {f"backend_impl.cpython-{tag}-x86_64-linux-gnu.so"}  # other Pythons' builds left out
    assert not list(site.rglob("*.h")) and not list(site.rglob("__pycache__"))
    code = "import nvidia.dali.plugin.pytorch, webdataset, torch; print(nvidia.dali.__file__, webdataset.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(path.startswith(str(site)) for path in done.stdout.split())


def test_phase_a_runs_the_torch_figures_first_then_the_tests_then_larger_sizes(tmp_path):
    phase = first_contact.Phase("a", tmp_path / "carry", tmp_path / "out", 300)
    found = {"cuda": True, "r3gan": {"32": {"width": 512, "batch": 64}, "64": {"width": 256, "batch": 32}}}
    steps = first_contact.torch_steps(phase, found)
    assert [s.step for s in steps] == ["prepare", "train-preset", "loader-torch", "checkpoint", "export", "tests",
                                       "r3gan-32", "prepare-64", "r3gan-64", "compile"]
    preset = " ".join(steps[1].command)
    assert "--arch dcgan" in preset and "--channels-last on" in preset and "--r1 0.05" in preset
    assert "--width 512 --batch-size 64" in " ".join(steps[6].command)  # sized by the project's estimator
    assert "not dali" in steps[5].command and "-v" in steps[5].command  # verdicts line by line


def test_each_record_is_written_when_its_step_ends_and_the_phase_stops_before_its_limit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    phase = first_contact.Phase("a", tmp_path / "carry", out, 8 + first_contact.MARGIN)
    phase.carry.mkdir()
    read_back = f"import json; print([r['step'] for r in json.load(open({str(out / 'first-contact.json')!r}))])"
    first = first_contact.Step("a", "first", [sys.executable, "-c", "print('one')"], 30)
    second = first_contact.Step("a", "second", [sys.executable, "-c", read_back], 30)
    slow = first_contact.Step("a", "slow", [sys.executable, "-c", "import time; time.sleep(30)"], 30)
    after = first_contact.Step("a", "after", [sys.executable, "-c", "print('never')"], 30, needs="first")
    started = time.monotonic()
    assert phase.run(first) and phase.run(second)
    assert "['first']" in second.tail  # the first record was on disk while the second step ran
    assert not phase.run(slow)
    assert slow.rc == 124 and time.monotonic() - started < 8 + 2
    assert not phase.run(after, set())
    assert after.skipped == first_contact.SPENT and after.rc is None
    records = json.loads((out / "first-contact.json").read_text())
    assert [(r["step"], r["rc"]) for r in records] == [("first", 0), ("second", 0), ("slow", 124), ("after", None)]
    assert json.loads((phase.carry / "records.json").read_text()) == records
    assert "[a:slow] rc 124" in (out / "first-contact.log").read_text()


def test_a_step_whose_need_failed_is_skipped_with_the_reason(tmp_path):
    phase = first_contact.Phase("a", tmp_path / "carry", tmp_path, 60)
    phase.carry.mkdir()
    step = first_contact.Step("a", "export", [sys.executable, "-c", "print('x')"], 30, needs="checkpoint")
    assert not phase.run(step, {"checkpoint"})
    assert step.skipped == "checkpoint failed" and step.rc is None


def test_the_carried_packages_come_first_on_pythonpath_before_what_it_held(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    phase = first_contact.Phase("a", tmp_path / "carry", tmp_path, 60)
    assert phase.env()["PYTHONPATH"].split(os.pathsep) == [str(phase.site), str(ROOT), "/elsewhere"]


def test_phase_b_says_when_the_machine_was_started_afresh(packed, tmp_path):
    pack, _ = packed
    carry = tmp_path / "carry"
    (carry / "call-b").mkdir(parents=True)
    for name in ("manifest.json", "dali.tar.xz.01"):
        (carry / "call-b" / name).symlink_to(pack / "call-b" / name)
    phase = first_contact.Phase("b", carry, tmp_path, 30)
    assert not first_contact.phase_b(phase)
    assert phase.records[-1]["skipped"].startswith("the machine was started afresh")
    (carry / "call-a").symlink_to(pack / "call-a")
    assert first_contact.phase_b(phase)


def test_the_site_tar_holds_the_small_packages_only(packed):
    pack, _ = packed
    with tarfile.open(pack / "call-a" / "site.tar.xz") as tar:
        tops = {name.split("/")[0].split("-")[0] for name in tar.getnames()}
    assert {"webdataset", "braceexpand"} <= tops and not any(t.startswith("nvidia") for t in tops)


def test_test_verdicts_are_read_from_pytest_output_even_when_it_was_cut_short(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest, time\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert False\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_skipped(): pass\n"
        "def test_hangs(): time.sleep(60)\n")
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path / "test_sample.py")]
    whole = subprocess.run(command[:-1] + ["-k", "not hangs", command[-1]], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120).stdout
    assert first_contact.verdicts(whole) == {"passed": 1, "failed": 1, "skipped": 1, "finished": True,
                                             "failed_tests": ["test_sample.py::test_fails"]}
    try:
        subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=10)
    except subprocess.TimeoutExpired as cut:
        partial = cut.stdout.decode() if isinstance(cut.stdout, bytes) else cut.stdout or ""
    assert first_contact.verdicts(partial)["finished"] is False
    assert first_contact.verdicts(partial)["passed"] == 1


def test_phase_c_takes_up_phase_a_steps_left_for_time_in_their_order(tmp_path):
    phase = first_contact.Phase("c", tmp_path / "carry", tmp_path, 240)
    found = {"cuda": False}
    for step in first_contact.torch_steps(phase, found):
        spent = step.step in ("r3gan-64", "compile", "prepare-64")
        phase.records.append({"phase": "a", "step": step.step, "rc": None if spent else 0,
                              "skipped": first_contact.SPENT if spent else None})
    phase.records.append({"phase": "a", "step": "export", "rc": None, "skipped": "checkpoint failed"})
    assert [s.step for s in first_contact.left_for_time(phase, found)] == ["prepare-64", "r3gan-64", "compile"]


def test_a_call_too_small_for_the_tree_is_refused_before_any_dali_is_packed(tmp_path):
    data = write_tar(tmp_path / "test.tar", cifar_members("test", 2))
    with pytest.raises(SystemExit, match="leave no room in a call of 3 MiB; raise --call-mib"):
        first_contact_pack.pack(tmp_path / "pack", data, PYTHON, 3 * 2**20)
    assert not list((tmp_path / "pack").rglob("dali.tar.xz*"))
