"""click parameter types of cgan-pipe's options: comma-separated lists, seed ranges, class requests, local
paths and shard-set locations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .errors import ConfigError
from .locations import location, refused_url


class IntList(click.ParamType):
    """Comma-separated whole numbers, each in [lo, hi], e.g. '10,30,50'; `length` fixes how many."""

    name = "numbers"

    def __init__(self, lo: int = 1, hi: int | None = None, length: int | None = None, ascending: bool = False):
        self.lo, self.hi, self.length, self.ascending = lo, hi, length, ascending

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            numbers = [int(item) for item in str(value).split(",") if item.strip()]
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated whole numbers", param, ctx)
        within = all(self.lo <= n and (self.hi is None or n <= self.hi) for n in numbers)
        if not numbers or not within or (self.length and len(numbers) != self.length) or (
                self.ascending and numbers != sorted(numbers)):
            count = f"{self.length} " if self.length else ""
            bounds = f"between {self.lo} and {self.hi}" if self.hi is not None else f"of at least {self.lo}"
            order = ", ascending" if self.ascending else ""
            self.fail(f"{value!r}: expected {count}comma-separated numbers {bounds}{order}", param, ctx)
        return numbers


class WordList(click.ParamType):
    """Comma-separated words, each one of `choices`, e.g. 'dali,torch'."""

    name = "words"

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        words = tuple(word.strip() for word in str(value).split(",") if word.strip())
        unknown = [word for word in words if word not in self.choices]
        if not words or unknown:
            self.fail(f"{value!r}: expected some of {', '.join(self.choices)}"
                      + (f" ({unknown[0]!r} is not one)" if unknown else ""), param, ctx)
        return words


class SeedRange(click.ParamType):
    """'A-B': seeds A to B inclusive, as (A, number of seeds)."""

    name = "A-B"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        first, sep, last = str(value).partition("-")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()) or int(last) < int(first):
            self.fail(f"{value!r}: expected A-B with 0 <= A <= B, e.g. 0-999", param, ctx)
        return int(first), int(last) - int(first) + 1


class ClassRequest(click.ParamType):
    """'cat,dog': those classes (a list); 'cat=10,dog=5': that many of each (a mapping)."""

    name = "classes"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> list[str] | dict[str, int]:
        if isinstance(value, (list, dict)):
            return value
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not any("=" in item for item in items):
            return items
        counts = {}
        for item in items:
            name, _, count = item.partition("=")
            if not count.strip().isdigit() or int(count) < 1:
                self.fail(f"{value!r}: {item!r} is not NAME=COUNT with a count >= 1 (give all classes as names, "
                          f"or all as NAME=COUNT)", param, ctx)
            counts[name.strip()] = int(count)
        return counts


class LocalPath(click.Path):
    """click.Path that refuses a URL (exit 2) rather than taking s3://b/x for the local folder s3:/b/x."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        refusal = refused_url(value)
        if refusal:
            self.fail(refusal, param, ctx)
        return super().convert(value, param, ctx)


class ShardLocation(click.ParamType):
    """A shard set's folder (a Path, which must exist with `exists`) or URL (a str: s3://bucket/prefix, and for
    reading http(s):// and gs://), checked; `write` for a place a command writes."""

    name = "folder|url"

    def __init__(self, write: bool = False, exists: bool = False):
        self.write, self.exists = write, exists

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        try:
            where = location(value, param.human_readable_name if param else "location", write=self.write)
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 1)[1], param, ctx)
        if self.exists and isinstance(where, Path) and not where.is_dir():
            self.fail(f"folder {value!r} does not exist", param, ctx)
        if self.write and isinstance(where, Path) and where.exists() and not where.is_dir():
            self.fail(f"{value!r} is a file; give a folder (a new one is made)", param, ctx)
        return where
