"""``mailpolicy diff``: what would change if I applied this new policy? (docs/diff.md)"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO


def register(sub: Any) -> None:
    p = sub.add_parser(
        "diff",
        help="replay cases (or an mbox) under two policies; print the replies that change",
        description="Replay every case under OLD and under NEW (each case's own policy is "
        "replaced, its accounts kept) and print only the replies that differ: the command, "
        "the reply before and after, the rules involved; then a summary. With --mbox, judge "
        "each message of an mbox file under both (as `replay --mbox` does) and print the "
        "verdicts that differ. A progress bar is shown when the output is a terminal.",
    )
    p.add_argument("old", metavar="OLD.toml")
    p.add_argument("new", metavar="NEW.toml")
    p.add_argument("paths", nargs="*", metavar="CASE.json|DIR")
    p.add_argument("--mbox", metavar="FILE", help="judge the messages of this mbox instead")
    p.add_argument(
        "--receiver",
        metavar="NAME|NETWORK",
        action="append",
        help="with --mbox: one of our host names in Received: headers, or a network of our "
        "servers; may be given several times",
    )
    p.add_argument(
        "--dns", metavar="ZONE.json", help="with --mbox: answer DNS questions from this zone"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per change, then a summary")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a replay that takes longer (the session stalls); default 10",
    )
    p.set_defaults(func=run)


def _reply_text(r: Any) -> str:
    if r is None:
        return "(not sent)"
    enhanced = f"{r.enhanced} " if r.enhanced else ""
    rule = f"  [{r.rule}]" if r.rule else ""
    observed = "".join(f"  (observed: {o})" for o in r.observed)
    return f"{r.code} {enhanced}{r.text}".replace("\n", " / ") + rule + observed


@contextlib.contextmanager
def _progress(total: int, enabled: bool, what: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on a terminal; a no-op otherwise."""
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=total)
        yield lambda: progress.advance(task)


def run(args: argparse.Namespace) -> int:
    from ..config import PolicyError, load_settings

    try:
        old = load_settings(args.old)
        new = load_settings(args.new)
    except PolicyError as e:
        print(e.report(), file=sys.stderr)
        return 2
    if bool(args.mbox) == bool(args.paths):
        print("mailpolicy diff: give case files or directories, or --mbox FILE", file=sys.stderr)
        return 2
    out = sys.stdout
    # The bar goes where the changes go, and only to a person watching.
    show = not args.no_progress and out.isatty() and sys.stderr.isatty()
    if args.mbox:
        return _diff_mbox(args, old, new, out, show)
    return _diff_cases(args, old, new, out, show)


def _print_change(out: TextIO, change: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(change.to_json()), file=out)
        return
    print(f"{change.case}  #{change.index} {change.cmd}", file=out)
    print(f"    before: {_reply_text(change.before)}", file=out)
    print(f"    after:  {_reply_text(change.after)}", file=out)


def _diff_cases(args: argparse.Namespace, old: Any, new: Any, out: TextIO, show: bool) -> int:
    from ..adapters.diff import CaseResult, diff_cases
    from ..adapters.replay import load_cases

    cases, errors = load_cases(args.paths)
    for err in errors:
        print(f"mailpolicy: {err}", file=sys.stderr)
    changed_cases = changes = failed = 0

    async def main(advance: Callable[[], None]) -> None:
        nonlocal changed_cases, changes, failed

        def seen(result: CaseResult) -> None:
            advance()

        async for result in diff_cases(old, new, cases, on_case=seen, timeout=args.timeout):
            if result.error is not None:
                failed += 1
                print(f"mailpolicy: {result.error}", file=sys.stderr)
                continue
            if result.changes:
                changed_cases += 1
                changes += len(result.changes)
            for change in result.changes:
                _print_change(out, change, args.json)

    with _progress(len(cases), show, "replaying") as advance:
        asyncio.run(main(advance))
    bad = len(errors) + failed
    summary = {
        "cases": len(cases),
        "changed_cases": changed_cases,
        "changed_replies": changes,
        "errors": bad,
    }
    if args.json:
        print(json.dumps({"summary": summary}), file=out)
    else:
        print(
            f"{changes} repl{'y' if changes == 1 else 'ies'} changed in {changed_cases} of "
            f"{len(cases)} cases" + (f"; {bad} could not be replayed" if bad else ""),
            file=out,
        )
    return 1 if bad else 0


def _diff_mbox(args: argparse.Namespace, old: Any, new: Any, out: TextIO, show: bool) -> int:
    from ..adapters.mbox import MboxError, diff_verdicts, judge_mbox, open_mbox, zone_from_file

    try:
        zone = zone_from_file(args.dns) if args.dns else None
        box = open_mbox(args.mbox)
    except MboxError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    from ..policy import compile_policy

    before_policy, after_policy = compile_policy(old), compile_policy(new)
    messages = changed = unreadable = 0
    with _progress(len(box), show, "judging") as advance:
        befores = judge_mbox(box, before_policy, zone=zone, receiver=args.receiver)
        afters = judge_mbox(box, after_policy, zone=zone, receiver=args.receiver)
        for before, after in zip(befores, afters, strict=True):
            advance()
            messages += 1
            if before.reason is not None:
                unreadable += 1
                continue
            diffs = diff_verdicts(before, after)
            if not diffs:
                continue
            changed += 1
            for d in diffs:
                if args.json:
                    print(json.dumps(d), file=out)
                else:
                    print(
                        f"message {d['message']} {d['message_id'] or ''}  RCPT {d['recipient']}",
                        file=out,
                    )
                    print(f"    before: {d['before_text']}", file=out)
                    print(f"    after:  {d['after_text']}", file=out)
    summary = {"messages": messages, "changed_messages": changed, "unreadable": unreadable}
    if args.json:
        print(json.dumps({"summary": summary}), file=out)
    else:
        print(
            f"{changed} of {messages} messages judged differently"
            + (f"; {unreadable} without a usable trace" if unreadable else ""),
            file=out,
        )
    return 0
