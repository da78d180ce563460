"""The tables of docs/results.md and README.md, generated from benchmarks/results/*.json.

    python benchmarks/results_doc.py            # rewrite every generated region in place
    python benchmarks/results_doc.py --check    # exit 1 (with a diff) where a doc differs from its JSONs

A generated region is the text between ``<!-- generated: NAME -->`` and ``<!-- end -->``; NAME is
one of the tables in ``results_tables.py`` (beside this file). Each table is followed by the JSON
files it read and the machine each one records ("machine not recorded" where a file has none), so a
number in the docs always has its file behind it. The prose around the regions is written by hand.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from sea_attention.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = (ROOT / "docs" / "results.md", ROOT / "README.md")
REGION = re.compile(r"(?P<open><!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- end -->)", re.S)
KS = (32, 64, 128)


class Results:
    """The JSON files of one results directory, read once each; remembers which a table read."""

    def __init__(self, directory: Path = RESULTS) -> None:
        self.directory = directory
        self._cache: dict[str, dict] = {}
        self.used: list[str] = []

    def load(self, name: str) -> dict:
        if name not in self._cache:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: a table names a results file that does not exist")
            self._cache[name] = json.loads(path.read_text())
        if name not in self.used:
            self.used.append(name)
        return self._cache[name]

    def points(self, names: str | tuple[str, ...], method: str) -> dict[int | None, dict]:
        """The `sea compare` points of one method, by budget k (None: every key), merged over ``names``."""
        found: dict[int | None, dict] = {}
        for name in (names,) if isinstance(names, str) else names:
            found.update({p["k"]: p for p in self.load(name).get("points", []) if p["method"] == method})
        if not found:
            raise KeyError(f"{names}: no points of method {method!r}")
        return found

    def point(self, name: str, method: str, k: int | None) -> dict:
        points = self.points(name, method)
        if k not in points:
            raise KeyError(f"{name}: method {method!r} has no point at k={k} (it has {sorted(points, key=str)})")
        return points[k]


def machine(result: dict) -> str:
    """One line for the machine a results file records."""
    info = result.get("machine")
    if isinstance(info, str):
        return f"{info} (CPU model not recorded)"
    if not isinstance(info, dict):
        return result.get("machine_note") or "machine not recorded"
    cores = f"{info['cpus']}-core " if "cpus" in info else ""
    parts = [cores + info.get("cpu_model", "CPU model not recorded")]
    if "cpu_capability" in info:
        parts.append(info["cpu_capability"])
    if "threads" in info:
        parts.append(f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}")
    for key in ("matmul_gflops", "matmul_gflops_idle"):
        if key in info:
            parts.append(f"{info[key]:.0f} GFLOP/s fp32 matmul{' (idle)' if key.endswith('idle') else ''}")
    note = info.get("note") or result.get("machine_note")
    return ", ".join(parts) + (f" ({note})" if note else "")


def sources(results: Results) -> str:
    """`Sources:` the files a table read, grouped by the machine each records."""
    groups: dict[str, list[str]] = {}
    for name in results.used:
        groups.setdefault(machine(results.load(name)), []).append(f"`{name}`")
    lines = [f"{', '.join(names)}: {where}" for where, names in groups.items()]
    return "Sources (`benchmarks/results/`; machine as recorded in each file): " + "; ".join(lines) + "."


# ---- formatting --------------------------------------------------------------------------------

def num(value: float | None, digits: int = 2) -> str:
    """A number as the docs print it: '-' for none, thousands separated, big perplexities to 0.1."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.1f}" if digits else f"{value:,.0f}"
    return f"{value:.{digits}f}"


def joined(values: Iterable[str]) -> str:
    return " / ".join(values)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---- cells: each reads what it shows from the results ------------------------------------------

Cell = Callable[[Results], str]


def text(value: str) -> Cell:
    """A cell that names something (a method, a setting): no number from a file."""
    return lambda results: value


def ppl(names: str | tuple[str, ...], method: str = "sea", ks: tuple[int, ...] = KS, ratio: bool = False) -> Cell:
    """Perplexity at each budget in ``ks`` ('-' where no file has it); one value for every-key methods.

    ``names``: one file, or several whose points together cover the budgets (k=64 in one, 32 and 128 in another).
    """
    def cell(results: Results) -> str:
        points = results.points(names, method)
        if None in points:
            return _ppl_text(points[None], ratio)
        if not any(k in points for k in ks):
            raise KeyError(f"{names}: method {method!r} has none of k={ks}")
        return joined(_ppl_text(points[k], ratio) if k in points else "-" for k in ks)
    return cell


def _ppl_text(point: dict, ratio: bool) -> str:
    return num(point["perplexity"]) + (f" (x{point['ratio']:.3f})" if ratio else "")


def passkey(name: str, method: str, k: int | None, lengths: tuple[int, ...] = (1024, 2048, 4096)) -> Cell:
    """Correct answers / prompts at each length."""
    def cell(results: Results) -> str:
        found = {(p["method"], p["k"], p["length"]): p for p in results.load(name)["points"]}
        missing = [n for n in lengths if (method, k, n) not in found]
        if missing:
            raise KeyError(f"{name}: no passkey point for {method!r} k={k} at lengths {missing}")
        return ", ".join(f"{found[method, k, n]['correct']}/{found[method, k, n]['prompts']}" for n in lengths)
    return cell


def recall(name: str) -> Cell:
    """`sea diagnose`: recall of the oracle's covered mass, mean over layers."""
    return lambda results: f"{results.load(name)['summary']['recall']:.3f}"


def speed(name: str, method: str, length: int) -> Cell:
    """`sea bench attention`: seconds (peak MB) of one forward."""
    def cell(results: Results) -> str:
        found = [p for p in results.load(name)["points"] if p["method"] == method and p["length"] == length]
        if not found:
            raise KeyError(f"{name}: no bench point for {method!r} at T={length}")
        point = found[0]
        if point["seconds"] is None:
            return point["note"] or "skipped"
        return f"{point['seconds']:.2f} s ({num(point['peak_mb'], 0)} MB)"
    return cell


def grid(header: list[str], rows: list[list[Cell]]) -> Callable[[Results], str]:
    """A table whose every cell is read from the results when it is rendered."""
    return lambda results: table(header, [[cell(results) for cell in row] for row in rows])


# ---- regions -----------------------------------------------------------------------------------

def render(name: str, tables: dict[str, Callable[[Results], str]], directory: Path = RESULTS) -> str:
    """One generated region's body: the table, then its sources."""
    if name not in tables:
        raise KeyError(f"no table named {name!r}; the tables are: {', '.join(sorted(tables))}")
    results = Results(directory)
    body = tables[name](results)
    return f"{body}\n\n{sources(results)}\n"


def regenerate(doc: str, tables: dict[str, Callable[[Results], str]], directory: Path = RESULTS) -> str:
    """``doc`` with every generated region rewritten from the results."""
    def replace(match: re.Match) -> str:
        return match["open"] + render(match["name"], tables, directory) + match["close"]
    return REGION.sub(replace, doc)


def check(paths: Iterable[Path], tables: dict[str, Callable[[Results], str]], directory: Path = RESULTS) -> list[str]:
    """Unified diffs of the docs whose generated regions differ from the results (empty: all agree)."""
    diffs = []
    for path in paths:
        now = path.read_text()
        want = regenerate(now, tables, directory)
        if want != now:
            diffs.append("".join(difflib.unified_diff(now.splitlines(True), want.splitlines(True),
                                                      f"{path} (committed)", f"{path} (from the JSONs)")))
    return diffs


def load_tables() -> dict[str, Callable[[Results], str]]:
    """The table definitions of results_tables.py, beside this file."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import results_tables
    finally:
        sys.path.pop(0)
    return results_tables.TABLES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docs", nargs="*", type=Path, default=list(DOCS), help="markdown files (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a doc is out of date")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results directory")
    args = parser.parse_args(argv)
    tables = load_tables()
    if args.check:
        diffs = check(args.docs, tables, args.results)
        sys.stdout.write("".join(diffs))
        if diffs:
            print("out of date: run `python benchmarks/results_doc.py` to regenerate", file=sys.stderr)
        return 1 if diffs else 0
    for path in args.docs:
        write_text(path, regenerate(path.read_text(), tables, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
