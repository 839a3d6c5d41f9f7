"""Mutation testing of the pure core on a random sample (``nox -s mutation``).

mutmut 3 does the work (configuration: ``[tool.mutmut]`` in pyproject.toml):
it writes every mutant of the core modules into ``mutants/``, runs the
selected test files once to learn which tests reach which function, then
runs each mutant against only those tests, in forked workers. This script
adds what mutmut lacks: a reproducible random sample of the mutants (the
whole core is about 3,600 of them, hours of work on two CPUs) and a score
per module. See docs/testing.md.

    python tools/mutation.py [--sample 330] [--seed 17] [--jobs 2] [--only rules/lists]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

MUTANTS = Path("mutants")
#: mutmut's exit codes (mutmut/stats.py): a mutant is caught when its tests
#: fail (1, 3: pytest's internal error) or it runs out of time
KILLED = {1, 3}
TIMEOUT = {36, 24, -24, 152, 255}
STATUS = {0: "survived", 33: "no tests", 5: "no tests", 35: "suspicious", None: "not run"}


def all_mutants() -> dict[str, str]:
    """Every mutant name, with the module file it belongs to."""
    out: dict[str, str] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = str(meta.relative_to(MUTANTS / "src"))[: -len(".meta")]
        for name in json.loads(meta.read_text())["exit_code_by_key"]:
            out[name] = module
    return out


def results() -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for meta in MUTANTS.rglob("*.py.meta"):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def mutmut(jobs: int, names: list[str]) -> None:
    # mutmut exits non-zero when mutants survive: that is a result, not an error
    # the mutmut beside this interpreter (a venv's bin need not be on PATH)
    exe = Path(sys.executable).parent / "mutmut"
    command = str(exe) if exe.exists() else "mutmut"
    subprocess.run([command, "run", "--max-children", str(jobs), *names], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=330, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=17, help="random seed of the sample")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument(
        "--only", action="append", default=[], help="only modules whose path has this (repeatable)"
    )
    parser.add_argument(
        "--all-of",
        action="append",
        default=[],
        help="also run every mutant of modules whose path has this (scored apart)",
    )
    parser.add_argument("--fail-under", type=float, default=0.0, help="exit 1 under this score")
    args = parser.parse_args(argv)

    started = time.monotonic()
    # Fresh mutants and fresh stats: stale ones would score old code.
    shutil.rmtree(MUTANTS, ignore_errors=True)
    # Generating the mutants and tracing the tests happen inside `mutmut
    # run`; one mutant of a small module makes it do just that.
    mutmut(args.jobs, ["mailpolicy.rules.protocol.*__mutmut_1"])
    everything = all_mutants()
    only: list[str] = args.only or [""]
    pool = sorted(n for n, module in everything.items() if any(o in module for o in only))
    sample = pool if not args.sample else random.Random(args.seed).sample(pool, args.sample)
    whole = sorted(n for n, m in everything.items() if any(a in m for a in args.all_of))
    mutmut(args.jobs, sorted(set(sample) | set(whole)))

    found = results()
    code = _report(
        f"sample: {len(sample)} of {len(pool)} mutants, seed {args.seed}",
        sample,
        everything,
        found,
        args.fail_under,
    )
    if whole:
        _report(f"every mutant of {', '.join(args.all_of)}", whole, everything, found, 0.0)
    minutes = (time.monotonic() - started) / 60
    print(f"\n{minutes:.1f} minutes")
    return code


def _report(
    title: str,
    sample: list[str],
    everything: dict[str, str],
    found: dict[str, int | None],
    fail_under: float,
) -> int:
    by_module: dict[str, Counter[str]] = {}
    survivors: list[tuple[str, str]] = []
    for name in sample:
        code = found.get(name)
        module = everything[name]
        if code in KILLED:
            status = "killed"
        elif code in TIMEOUT:
            status = "timeout"
        else:
            status = STATUS.get(code, f"exit {code}")
            survivors.append((name, status))
        by_module.setdefault(module, Counter())[status] += 1

    print()
    print(title)
    print(f"{'module':34} {'mutants':>7} {'killed':>6} {'timeout':>7} {'alive':>5} {'score':>6}")
    total = Counter[str]()
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        print(_row(module, c))
    print(_row("overall", total))
    if survivors:
        print("\nalive (see each with: mutmut show NAME):")
        for name, status in sorted(survivors):
            print(f"  {name}  [{status}]")
    return 1 if _score(total) < fail_under else 0


def _score(c: Counter[str]) -> float:
    n = sum(c.values())
    return 100.0 * (c["killed"] + c["timeout"]) / n if n else 100.0


def _row(module: str, c: Counter[str]) -> str:
    n = sum(c.values())
    alive = n - c["killed"] - c["timeout"]
    return f"{module:34} {n:7} {c['killed']:6} {c['timeout']:7} {alive:5} {_score(c):5.1f}%"


if __name__ == "__main__":
    sys.exit(main())
