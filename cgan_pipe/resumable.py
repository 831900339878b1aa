"""Work in numbered parts that a killed run resumes: a plan file, a done record per finished part, and the
rules for what is kept and what is removed. prepare (a shard per part) and export (a shard and files per
part) both write through it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .atomic import TEMP_MARK, write_text_atomic


@dataclass(frozen=True)
class ResumableParts:
    """The parts of one job: `plan_name` and the done records (`<record_prefix>NNNNNN.done.json`) live in
    `records`, each part's shard (`shard-NNNNNN.tar` + `.idx`, or none) in `shards`.

    A part is done when its record exists and names a shard that is whole (its tar of the recorded size,
    and its index), or no shard. Records are written only after the part's files are complete, and under
    a temp name, so a killed run never leaves a part that looks done but is not.
    """

    records: Path
    shards: Path
    plan_name: str
    record_prefix: str

    def same_plan(self, plan: dict[str, Any]) -> bool:
        """Whether the unfinished job here was planned as `plan` (so its done parts can be kept)."""
        try:
            return json.loads((self.records / self.plan_name).read_text()) == plan
        except (OSError, ValueError):
            return False

    def done(self) -> dict[int, dict[str, Any]]:
        """The records of the finished parts, by part number."""
        found = {}
        for path in self.records.glob(f"{self.record_prefix}*.done.json"):
            number = self.number(path.name)
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            shard = record.get("shard")
            if number is not None and (shard is None or self._whole(shard)):
                found[number] = record
        return found

    def resume(self, plan: dict[str, Any], mine: Callable[[int], bool] = lambda number: True,
               owned: Callable[[str], bool] = lambda name: True) -> dict[int, dict[str, Any]]:
        """Start or resume the job `plan` for the parts `mine` selects: the finished ones of an unfinished
        job with the same plan are kept and returned; every other file of those parts that is `owned` (written
        by cgan-pipe: shards of other settings or never finished, temp files of a killed writer, stale records)
        is removed. Files of parts that are not `mine` (another rank's), and files that are not `owned`, are
        left alone. Then the plan is recorded."""
        kept = {n: r for n, r in self.done().items() if mine(n)} if self.same_plan(plan) else {}
        keep = {self.record_name(n) for n in kept}
        keep |= {name for r in kept.values() if r.get("shard") for name in (r["shard"]["tar"], r["shard"]["index"])}
        for path in self.files(mine):
            if path.name not in keep and owned(path.name):
                path.unlink()
        self.records.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.records / self.plan_name, json.dumps(plan))
        return kept

    def files(self, mine: Callable[[int], bool] = lambda number: True) -> list[Path]:
        """The regular files in the job's folders named as a part of `mine` is (a shard, its index, a done
        record, or a temp file of one of these), whoever wrote them."""
        found = []
        for folder in {self.records, self.shards}:
            for path in folder.iterdir() if folder.is_dir() else ():
                number = self.number(path.name)
                if number is not None and mine(number) and path.is_file():
                    found.append(path)
        return found

    def mark_done(self, number: int, record: dict[str, Any]) -> None:
        """Record part `number` as finished (call once its files are complete)."""
        write_text_atomic(self.records / self.record_name(number), json.dumps(record))

    def finish(self) -> None:
        """Remove the plan and the done records, once the job's final outputs (its manifest) are written."""
        for path in self.records.glob(f"{self.record_prefix}*.done.json"):
            path.unlink()
        (self.records / self.plan_name).unlink(missing_ok=True)

    def record_name(self, number: int) -> str:
        """The name of part `number`'s done record."""
        return f"{self.record_prefix}{number:06d}.done.json"

    def number(self, name: str) -> int | None:
        """The part a file name belongs to: shard-NNNNNN.tar or .idx, the part's done record, or a temp file of
        one of these (`.NAME.tmp-PID`); None for any other name, such as shard-000001.notes.txt."""
        stem = re.escape(self.record_prefix)
        match = re.fullmatch(rf"\.?(?:shard-(\d{{6}})\.(?:tar|idx)|{stem}(\d{{6}})\.done\.json)"
                             rf"(?:{re.escape(TEMP_MARK)}\d+)?", name)
        if not match or (name.startswith(".") and TEMP_MARK not in name and match.group(1)):
            return None  # .shard-NNNNNN.tar is no name of ours
        return int(match.group(1) or match.group(2))

    def _whole(self, shard: dict[str, Any]) -> bool:
        tar, index = self.shards / shard["tar"], self.shards / shard["index"]
        return tar.is_file() and tar.stat().st_size == shard["bytes"] and index.is_file()
