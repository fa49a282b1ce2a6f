"""``radflow dlq``: list, show and replay dead letters (and held instances).

Every dead-letter topic is read (``dicom.instance.failed``, ``dicom.forward.failed``,
``report.failed``) and ``dicom.instance.held``. A replay publishes each letter's
original record again, unchanged, with its original key, to the topic it was first
read from: the consumers' idempotency keys and markers make that safe to repeat (a
request already delivered is not sent again), and requests ``dicom.forward.completed``
already shows delivered are not even re-published.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import replace
from typing import Any

from aiokafka.errors import KafkaError

from radflow_core.cli.common import output_arguments, when
from radflow_core.cli.dlq import output
from radflow_core.cli.dlq.letters import LETTER_TOPICS, Filters, Letter, parse_id
from radflow_core.cli.dlq.replay import Outcome, plan
from radflow_core.cli.dlq.source import find_originals, publish, read_letters, settled
from radflow_core.errors import PipelineError
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic

EXIT_OK = 0
EXIT_NOT_DONE = 1
"""Something asked for was not found, or could not be replayed."""
EXIT_UNAVAILABLE = 3
"""The settings are invalid or the broker could not be used."""


def register(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "dlq",
        help="list, show and replay dead letters",
        description="Dead letters of every stage (and instances held by the rules), "
        "and their replay.",
    )
    actions = command.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="dead letters, filtered, oldest first")
    _filters(listing)
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one dead letter, with its original record")
    show.add_argument("id", help="<topic>:<partition>:<offset>, as `dlq list` prints it")
    _common(show)
    show.set_defaults(handler=_show)

    replay = actions.add_parser(
        "replay",
        help="publish the selected letters' originals again",
        description="Publish each selected letter's original record again, unchanged, with "
        "its key, to its source topic. Requests dicom.forward.completed shows delivered are "
        "skipped; the same request is published once however many letters it has.",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="letters to replay (default: all)")
    _filters(replay)
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; publish nothing"
    )
    replay.add_argument(
        "--ignore-completed",
        action="store_true",
        help="re-publish requests even if dicom.forward.completed shows them delivered (the "
        "forwarder's markers still keep it from sending them twice)",
    )
    replay.set_defaults(handler=_replay)


def _common(parser: argparse.ArgumentParser) -> None:
    output_arguments(parser, "one JSON object per line", idle_s=1.5)


def _filters(parser: argparse.ArgumentParser) -> None:
    names = [t.value for t in LETTER_TOPICS]
    parser.add_argument("--topic", action="append", choices=names, default=[], help="repeatable")
    parser.add_argument(
        "--reason", action="append", default=[], help="reason or pattern (rejected, retries_*)"
    )
    parser.add_argument(
        "--destination", action="append", default=[], help="destination or site, or a pattern"
    )
    parser.add_argument("--study", action="append", default=[], help="Study Instance UID")
    parser.add_argument(
        "--since",
        type=when,
        help="appended at or after: ISO 8601 (UTC if no zone) or 30m, 2h, 3d ago",
    )
    parser.add_argument("--until", type=when, help="appended at or before (same forms)")
    _common(parser)


def _filters_of(args: argparse.Namespace, ids: tuple[str, ...] = ()) -> Filters:
    return Filters(
        topics=tuple(Topic(t) for t in args.topic),
        reasons=tuple(args.reason),
        destinations=tuple(args.destination),
        studies=tuple(args.study),
        ids=ids,
    )


def _settings() -> KafkaSettings:
    return KafkaSettings.from_env(os.environ)


def _run(args: argparse.Namespace, work: Any) -> int:
    """Run ``work(kafka)``; settings and broker errors become a message and exit 3."""
    try:
        kafka = _settings()
        status: int = asyncio.run(work(kafka))
    except PipelineError as exc:
        print(f"radflow dlq: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KafkaError as exc:  # from the history reader, which does not map them
        print(f"radflow dlq: the broker cannot be used: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return status


def _list(args: argparse.Namespace) -> int:
    async def work(kafka: KafkaSettings) -> int:
        found = await read_letters(kafka, _filters_of(args), args.since, args.until, args.idle_s)
        if args.json:
            output.json_lines([x.summary() for x in found], sys.stdout)
        else:
            output.letters_table(found, sys.stdout)
        return EXIT_OK

    return _run(args, work)


def _show(args: argparse.Namespace) -> int:
    try:
        parse_id(args.id)
    except ValueError as exc:
        print(f"radflow dlq show: {exc}", file=sys.stderr)
        return EXIT_NOT_DONE

    async def work(kafka: KafkaSettings) -> int:
        found = await read_letters(kafka, Filters(ids=(args.id,)), idle_s=args.idle_s)
        if not found:
            print(f"radflow dlq show: no dead letter {args.id} is retained", file=sys.stderr)
            return EXIT_NOT_DONE
        letter = found[0]
        if letter.original is None and letter.lookup is not None:
            originals = await find_originals(kafka, [letter], args.idle_s)
            if letter.id in originals:
                letter = replace(letter, original=originals[letter.id])
        if args.json:
            output.json_lines(
                [{**letter.summary(), "envelope": letter.envelope, "original": _raw(letter)}],
                sys.stdout,
            )
        else:
            output.letter_detail(letter, sys.stdout)
        return EXIT_OK

    return _run(args, work)


def _replay(args: argparse.Namespace) -> int:
    ids = tuple(args.ids)
    try:
        for item in ids:
            parse_id(item)
    except ValueError as exc:
        print(f"radflow dlq replay: {exc}", file=sys.stderr)
        return EXIT_NOT_DONE

    async def work(kafka: KafkaSettings) -> int:
        letters = await read_letters(
            kafka, _filters_of(args, ids), args.since, args.until, args.idle_s
        )
        missing = sorted(set(ids) - {x.id for x in letters})
        originals = await find_originals(kafka, letters, args.idle_s)
        keys = {x.settled_by for x in letters if x.settled_by}
        done = {} if args.ignore_completed else await settled(kafka, keys, args.idle_s)
        actions = plan(letters, done, originals)
        published = 0 if args.dry_run else await publish(kafka, actions)
        if args.json:
            output.json_lines([a.summary() for a in actions], sys.stdout)
        else:
            if actions:
                output.actions_table(actions, sys.stdout, args.dry_run)
            counts = {o: sum(a.outcome is o for a in actions) for o in Outcome}
            print(
                f"{'would replay' if args.dry_run else 'replayed'} "
                f"{counts[Outcome.REPLAY] if args.dry_run else published}, "
                f"skipped {counts[Outcome.SKIP]}, not replayable {counts[Outcome.CANNOT]}"
            )
        for item in missing:
            print(f"radflow dlq replay: no dead letter {item} is retained", file=sys.stderr)
        cannot = any(a.outcome is Outcome.CANNOT for a in actions)
        return EXIT_NOT_DONE if missing or cannot else EXIT_OK

    return _run(args, work)


def _raw(letter: Letter) -> dict[str, Any] | None:
    if letter.original is None:
        return None
    return {
        "topic": letter.original.topic,
        "key": letter.original.key,
        "value": letter.original.value,
    }
