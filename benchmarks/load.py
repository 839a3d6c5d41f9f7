"""Time and peak memory to load and compile a policy with 1,000,000 list entries
(not a test).

Run from the repository root, after ``pip install -e .``::

    python benchmarks/load.py              # 1,000,000 entries
    python benchmarks/load.py 100000       # another size

The policy file (written to a temporary folder) has every check on and
black/white lists of N entries of every kind: client networks of both
families, sender addresses and domains, HELO names, client host names and
recipients (see workload.py). Each measurement runs in a fresh Python
process, so nothing is cached and ``ru_maxrss`` is the load's own:

* ``load+compile``: ``mailpolicy.load_policy(path)`` (TOML, validation,
  settings, compiled lookup tables), wall time (best of three), and the
  process's peak RSS (``VmHWM``, or ``ru_maxrss`` where there is no /proc)
  before and after;
* the same under ``tracemalloc``: the peak of Python allocations during the
  load, and what the compiled policy keeps;
* the peer: ``tomllib.load`` of the same file alone, the floor any loader of
  this format pays.

Targets: load+compile under 3 s and under 300 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload
from evaluate import machine

MiB = 1024 * 1024

#: runs in a fresh interpreter: argv[1] is the file, argv[2] the mode
_CHILD = r"""
import json, resource, sys, time
mode, path = sys.argv[2], sys.argv[1]

def peak_rss():
    # VmHWM is this process's own peak (ru_maxrss can carry the parent's
    # over fork and exec)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

import mailpolicy, tomllib  # imports are not part of the load
out = {"rss_before": peak_rss()}
if mode == "load":
    start = time.perf_counter()
    policy = mailpolicy.load_policy(path)
    out["seconds"] = time.perf_counter() - start
elif mode == "traced":
    import gc, tracemalloc
    tracemalloc.start()
    policy = mailpolicy.load_policy(path)
    gc.collect()
    out["kept"], out["peak"] = tracemalloc.get_traced_memory()
    tracemalloc.stop()
else:
    start = time.perf_counter()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    out["seconds"] = time.perf_counter() - start
out["rss_after"] = peak_rss()
print(json.dumps(out))
"""


def child(path: Path, mode: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), mode],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def write_policy(folder: Path, size: int) -> tuple[Path, dict[str, int]]:
    entries = workload.list_entries(size)
    policy = workload.policy_mapping(workload.list_rules(entries))
    path = folder / "policy.toml"
    path.write_text(workload.to_toml(policy))
    kinds = {k: len(v) for k, v in entries.items()}
    return path, kinds


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["--write"]:  # in a child: keeps the measuring parent small
        _, kinds = write_policy(Path(argv[1]), int(argv[2]))
        print(json.dumps(kinds))
        return
    size = int(argv[0]) if argv else 1_000_000
    print(machine())
    with tempfile.TemporaryDirectory(prefix="mailpolicy-load-") as tmp:
        written = subprocess.run(
            [sys.executable, __file__, "--write", tmp, str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
        path, kinds = Path(tmp) / "policy.toml", json.loads(written.stdout)
        shares = ", ".join(f"{k} {v:,}" for k, v in kinds.items())
        print(
            f"policy file: {sum(kinds.values()):,} list entries, "
            f"{path.stat().st_size / MiB:.1f} MiB ({shares})"
        )
        print()
        runs = [child(path, "load") for _ in range(3)]
        best = min(runs, key=lambda r: r["seconds"])
        traced = child(path, "traced")
        peer = min((child(path, "tomllib") for _ in range(3)), key=lambda r: r["seconds"])
    rss = max(r["rss_after"] for r in runs)
    print(f"{'':<30} {'seconds':>8} {'peak RSS':>9} {'RSS at start':>13}")
    print(
        f"{'load_policy (load+compile)':<30} {best['seconds']:>8.2f} "
        f"{rss / MiB:>7.0f} MB {best['rss_before'] / MiB:>10.0f} MB"
    )
    print(
        f"{'peer: tomllib.load alone':<30} {peer['seconds']:>8.2f} "
        f"{peer['rss_after'] / MiB:>7.0f} MB {peer['rss_before'] / MiB:>10.0f} MB"
    )
    print()
    print(
        f"tracemalloc: peak {traced['peak'] / MiB:.0f} MB of Python allocations during the "
        f"load, {traced['kept'] / MiB:.0f} MB kept by the compiled policy"
    )
    times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
    print(
        f"load_policy / tomllib.load time: {best['seconds'] / peer['seconds']:.2f} "
        f"(the three load runs: {times} s)"
    )
    print(
        f"targets: < 3 s ({'met' if best['seconds'] < 3 else 'NOT met'}), < 300 MB peak RSS "
        f"({'met' if rss < 300 * MiB else 'NOT met'})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
