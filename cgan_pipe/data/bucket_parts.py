"""Resumable parts (resumable.py) whose files are uploaded into a bucket prefix as each part finishes: the
bucket holds every finished part's shard, index, other files and done record, so that a rerun on any
machine, and every rank of a job, sees the same parts, while local disk holds only the parts not yet
uploaded."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, DataError
from ..resumable import ResumableParts
from .bucket import (UPLOAD_THREADS, ObjectMissing, abort_unfinished_uploads, delete_objects, object_sizes, read_bytes,
                     upload_file, write_object)


def plan_digest(plan: dict[str, Any]) -> str:
    """The sha256 of a plan as JSON: what each done record in a bucket is tied to."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class BucketParts:
    """The parts of one job writing into the bucket prefix `url`, named as `names` names them (its plan
    object, `<record_prefix>NNNNNN.done.json`, and `<shards>shard-NNNNNN.tar` and .idx), with the other
    files a record lists under "files" (names relative to `url`, as to the local folder a part is written in).

    A part is done in the bucket when its record is there, tied to the job's plan, and its tar object has
    the recorded size: `ship` uploads a part's files before its record, so a record never announces objects
    that are not complete.
    """

    url: str
    names: ResumableParts  # only its names are used: the plan's, the records', the part numbers
    shards: str = ""  # where the shards are under `url`: "" or a folder with its slash, such as "shards/"

    def objects(self, record: dict[str, Any]) -> list[str]:
        """The objects of the part `record` describes, its record aside: the shard's tar first, its index, the
        other files."""
        shard = record.get("shard")
        return ([self.shards + shard["tar"], self.shards + shard["index"]] if shard else []) + record.get("files", [])

    def plan(self) -> dict[str, Any] | None:
        """The plan object of the unfinished job in the bucket, or None."""
        try:
            return json.loads(read_bytes(f"{self.url}/{self.names.plan_name}"))
        except (ObjectMissing, ValueError):  # a damaged plan is no plan: its parts are written again
            return None

    def done(self, plan: dict[str, Any], listed: dict[str, int] | None = None,
             mine: Callable[[int], bool] = lambda number: True) -> dict[int, dict[str, Any]]:
        """The records of the parts of `mine` finished in the bucket for `plan`, by part number (`listed`:
        the prefix's objects and sizes, with the shards', when already listed)."""
        listed = object_sizes(self.url) if listed is None else listed
        digest = plan_digest(plan)
        records = [name for name in listed if name.endswith(".done.json")
                   and (number := self.names.number(name)) is not None and mine(number)]

        def read(name: str) -> dict[str, Any] | None:
            try:
                record = json.loads(read_bytes(f"{self.url}/{name}"))
            except (ObjectMissing, ValueError):
                return None
            if not isinstance(record, dict) or record.get("plan") != digest:
                return None
            shard = record.get("shard")
            if shard is not None and (listed.get(self.shards + shard["tar"]) != shard["bytes"]
                                      or self.shards + shard["index"] not in listed):
                return None
            return record

        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            found = dict(zip(records, pool.map(read, records)))
        return {self.names.number(name): record for name, record in found.items() if record is not None}

    def claim(self, plan: dict[str, Any], listed: dict[str, int], mine: Callable[[int], bool],
              owned: Callable[[str], bool]) -> dict[int, dict[str, Any]]:
        """Start or resume `plan` in the bucket for the parts `mine` selects: keep and return the finished
        ones; delete the other objects of those parts (an older job's, or a killed upload's) that are
        `owned`; record the plan. ConfigError naming an object of those parts that is not `owned`."""
        kept = self.done(plan, listed, mine)
        stale = [name for name in listed if (number := self.names.number(name)) is not None and mine(number)
                 and number not in kept]
        foreign = [name for name in stale if not owned(name)]
        if foreign:
            raise ConfigError(f"{self.url}/{foreign[0]}: an object cgan-pipe did not write (no manifest or unfinished "
                              f"job in {self.url} lists it) is where a shard would go; write into another prefix, "
                              f"or delete it")
        delete_objects(self.url, stale)
        abort_unfinished_uploads(self.url, lambda name: (number := self.names.number(name)) is not None
                                 and mine(number))
        write_object(f"{self.url}/{self.names.plan_name}", json.dumps(plan).encode())
        return kept

    def ship(self, local: Path, number: int, record: dict[str, Any], plan: dict[str, Any]) -> None:
        """Upload part `number`, finished in the local folder `local` with `record`: its shard, index and
        other files, then its record (tied to `plan`); then delete the local copies."""
        shard, files = record.get("shard"), record.get("files", [])
        if shard is not None:
            tar, index = self.shards + shard["tar"], self.shards + shard["index"]
            upload_file(local / tar, f"{self.url}/{tar}", shard["sha256"])
            upload_file(local / index, f"{self.url}/{index}")
        if files:
            with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
                list(pool.map(lambda name: upload_file(local / name, f"{self.url}/{name}"), files))
        name = self.names.record_name(number)
        write_object(f"{self.url}/{name}", json.dumps({**record, "plan": plan_digest(plan)}).encode())
        for path in [local / object_name for object_name in self.objects(record)] + [local / name]:
            path.unlink(missing_ok=True)

    def records(self, plan: dict[str, Any], parts: int, listed: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """The records of all `parts` parts of `plan`, in order (`listed` as for `done`); DataError naming the
        missing ones."""
        done = self.done(plan, listed)
        missing = [f"shard-{number:06d}" for number in range(parts) if number not in done]
        if missing:
            raise DataError(f"{self.url}: {len(missing)} of {parts} shards are not uploaded yet (e.g. "
                            f"{', '.join(missing[:5])}); finish every rank, then merge")
        return [done[number] for number in range(parts)]

    def finish(self, parts: int, listed: dict[str, int] | None = None) -> None:
        """Delete the plan and the done records, and the objects of parts numbered `parts` or more that an
        older, larger job left, once the job's manifest is in the bucket."""
        listed = object_sizes(self.url) if listed is None else listed
        delete_objects(self.url, [name for name in listed if name == self.names.plan_name
                                  or ((number := self.names.number(name)) is not None
                                      and (name.endswith(".done.json") or number >= parts))])
