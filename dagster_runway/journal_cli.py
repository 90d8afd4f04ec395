"""``dagster-runway journal``: look into the submission journal and resolve "ambiguous" claims.

``list`` shows every image's latest attempt (ambiguous and open ones first), ``show`` every attempt
of one fingerprint, ``adopt`` attaches a request id found in the RunComfy history to an ambiguous
attempt (the status sensor then collects the video already paid for, instead of paying again), and
``spend`` sums the spend log. Errors are one line naming what is wrong and the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from dagster_runway._redact import redact_url
from dagster_runway.journal import AMBIGUOUS, CLAIMED, Claim, Journal, JournalDamaged, JournalError

PROG = "dagster-runway journal"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_ORDER = {AMBIGUOUS: 0, CLAIMED: 1}  # what needs the operator first


class UsageError(Exception):
    """A wrong option: the message names it and the fix."""


def _common(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--journal",
        metavar="URL",
        help="The journal's folder or URL (the pipeline option `journal`); this or --output.",
    )
    where.add_argument(
        "--output",
        metavar="URL",
        help="The pipeline's output folder or URL: the journal is <output>/.runway.",
    )
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        default="{}",
        help="fsspec storage options as a JSON object (the pipeline option `journal_storage_options`), "
        'for example \'{"endpoint_url": "http://127.0.0.1:9000"}\'.',
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The journal command's subcommands and options."""
    commands = parser.add_subparsers(dest="journal_command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "list",
        help="Every image's latest attempt, ambiguous and open ones first.",
        formatter_class=_Formatter,
    )
    _common(listing)
    show = commands.add_parser(
        "show", help="Every attempt of one fingerprint, in full.", formatter_class=_Formatter
    )
    _common(show)
    show.add_argument(
        "fingerprint",
        metavar="FINGERPRINT",
        help="A fingerprint, or a unique prefix of one (as `list` shows).",
    )
    adopt = commands.add_parser(
        "adopt",
        help="Attach a request id from your RunComfy history to an ambiguous attempt, so it is collected, not paid again.",
        formatter_class=_Formatter,
    )
    _common(adopt)
    adopt.add_argument("fingerprint", metavar="FINGERPRINT", help="A fingerprint, or a unique prefix of one.")
    adopt.add_argument(
        "request_id", metavar="REQUEST_ID", help="The request id, as the RunComfy history shows it."
    )
    adopt.add_argument(
        "--attempt", type=int, default=None, help="The attempt to adopt; without it, the latest."
    )
    adopt.add_argument("--note", default="", help="Why, for the record (kept in the claim's reason).")
    adopt.add_argument(
        "--no-check",
        action="store_true",
        help="Adopt without asking the service whether it knows the request id (by default it asks, with "
        "RUNCOMFY_API_TOKEN and RUNCOMFY_BASE_URL): a mistyped id would then end the ambiguity and let a later "
        "run pay again",
    )
    spend = commands.add_parser(
        "spend", help="The spend recorded: in all, and over a window.", formatter_class=_Formatter
    )
    _common(spend)
    spend.add_argument(
        "--window-h",
        type=float,
        default=None,
        metavar="H",
        help="Also sum the last H hours (as a rolling max_spend_usd window counts them).",
    )


def run(args: argparse.Namespace) -> int:
    try:
        journal = _open(args)
        return int(_COMMANDS[args.journal_command](journal, args))
    except (UsageError, JournalError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"{PROG}: error: the journal could not be read ({type(exc).__name__}: {exc}); check --journal/--output "
            "and --storage-options, and access to the store",
            file=sys.stderr,
        )
        return 2


def _open(args: argparse.Namespace) -> Journal:
    if args.journal:
        url = args.journal
    elif args.output:
        url = args.output.rstrip("/") + "/.runway"
    else:
        raise UsageError("say where the journal is: --journal URL, or --output URL for <output>/.runway")
    try:
        options = json.loads(args.storage_options)
    except ValueError as exc:
        raise UsageError(f"--storage-options is not JSON ({exc}); give a JSON object such as '{{}}'") from exc
    if not isinstance(options, Mapping):
        raise UsageError("--storage-options must be a JSON object such as '{\"anon\": false}'")
    try:
        return Journal(url, options)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"the journal {redact_url(url)} cannot be opened ({exc}); check its URL") from exc


def _utc(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) if at else "-"


def _state(claim: Claim) -> str:
    if claim.state == CLAIMED and claim.owner.process_alive() is False:
        return "claimed (owner gone)"
    return claim.state


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _list(journal: Journal, args: argparse.Namespace) -> int:
    damaged: list[JournalDamaged] = []
    claims = sorted(
        journal.iter_claims(on_damaged=damaged.append), key=lambda c: (_ORDER.get(c.state, 2), c.claimed_at)
    )
    rows = [
        ["STATE", "PARTITION", "FINGERPRINT", "ATTEMPT", "CLAIMED AT (UTC)", "SEED", "OWNER", "REQUEST ID"]
    ]
    for claim in claims:
        seed = claim.input.get("seed") if isinstance(claim.input, Mapping) else None
        rows.append(
            [
                _state(claim),
                claim.partition,
                claim.fingerprint[:12],
                str(claim.attempt),
                _utc(claim.claimed_at),
                "-" if seed is None else str(seed),
                claim.owner.describe(),
                claim.request_id or "-",
            ]
        )
    print(_table(rows) if claims else f"no claims in {redact_url(journal.url)}")
    for exc in damaged:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    if any(c.state == AMBIGUOUS or _state(c) != c.state for c in claims):
        print(
            "\nAn ambiguous attempt may have been billed. Find its request in your RunComfy history (by the seed and "
            f"the time above), then: {PROG} adopt FINGERPRINT REQUEST_ID"
        )
    return 2 if damaged else 0


def _resolve(journal: Journal, prefix: str) -> str:
    if len(prefix) < 2:
        raise UsageError(
            f"fingerprint {prefix!r} is too short; give at least its first 2 characters, as `list` shows"
        )
    found = journal.fingerprints(prefix)
    if not found:
        raise UsageError(
            f"no claims of a fingerprint starting {prefix!r} in {redact_url(journal.url)}; see `list`"
        )
    if len(found) > 1:
        raise UsageError(
            f"{len(found)} fingerprints start {prefix!r}; give more of it (`list` shows 12 characters)"
        )
    return found[0]


def _show(journal: Journal, args: argparse.Namespace) -> int:
    fingerprint = _resolve(journal, args.fingerprint)
    for claim in journal.claims(fingerprint):
        record: dict[str, Any] = asdict(claim)
        record["file"] = journal.where(journal.claim_path(fingerprint, claim.attempt))
        record["claimed_at_utc"], record["answered_at_utc"] = _utc(claim.claimed_at), _utc(claim.answered_at)
        print(json.dumps(record, indent=2, sort_keys=True, default=str))
    return 0


def _adopt(journal: Journal, args: argparse.Namespace) -> int:
    fingerprint = _resolve(journal, args.fingerprint)
    attempt = args.attempt
    if attempt is None:
        latest = journal.latest(fingerprint)
        if latest is None:
            raise UsageError(f"fingerprint {fingerprint} has no claims; see `list`")
        attempt = latest.attempt
    verify = None if args.no_check else _check_with_service
    adopted = journal.adopt(fingerprint, attempt, args.request_id, note=args.note, verify=verify)
    print(
        f"adopted: attempt {adopted.attempt} of {adopted.partition} ({fingerprint[:12]}) is submitted as request "
        f"{adopted.request_id}; the next run or status sensor tick collects it instead of paying again"
    )
    return 0


def _check_with_service(request_id: str) -> None:
    """The service must know the request: a mistyped id would end the ambiguity and let a later run pay again."""
    from dagster_runway.client import DEFAULT_BASE_URL, RunComfyClient
    from dagster_runway.errors import RequestNotFoundError, RunComfyError

    token = os.environ.get("RUNCOMFY_API_TOKEN")
    if not token:
        raise UsageError(
            "set RUNCOMFY_API_TOKEN (and RUNCOMFY_BASE_URL for a service other than RunComfy's) so that the "
            "request id is checked with the service before it is adopted, or pass --no-check if you are sure"
        )
    try:
        with RunComfyClient(
            api_token=token, base_url=os.environ.get("RUNCOMFY_BASE_URL") or DEFAULT_BASE_URL
        ) as client:
            client.status(request_id)
    except RequestNotFoundError:
        raise UsageError(
            f"the service does not know request {request_id[:40]!r} (mistyped, another account's, or expired); "
            "nothing was adopted and the attempt stays ambiguous: copy the id from your RunComfy history"
        ) from None
    except RunComfyError as exc:
        raise UsageError(
            f"could not check request {request_id[:40]!r} with the service ({exc}); try again"
        ) from None


def _spend(journal: Journal, args: argparse.Namespace) -> int:
    window_s = None if args.window_h is None else args.window_h * 3600
    if window_s is not None and window_s <= 0:
        raise UsageError(f"--window-h {args.window_h:g} must be more than 0 hours")
    summary = journal.spend_summary(window_s)
    print(
        f"spent in all: ${summary.total_usd:.2f} over {summary.entries} spend-log entries (estimates until settled)"
    )
    if summary.window_usd is not None:
        print(f"spent in the last {args.window_h:g} h: ${summary.window_usd:.2f}")
    return 0


_COMMANDS = {"list": _list, "show": _show, "adopt": _adopt, "spend": _spend}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=_Formatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
