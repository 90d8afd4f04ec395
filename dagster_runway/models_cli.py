"""``dagster-runway models``: what the RunComfy catalog says, from the service or a local emulator.

``models [SEARCH]`` lists the models whose id or name contains SEARCH, with their price; ``models show
MODEL_ID`` prints one model's price, unit, and input fields with their rules. It asks the service at
RUNCOMFY_BASE_URL (by default RunComfy's) with RUNCOMFY_API_TOKEN, or, with ``--emulator``, an emulator
started for the command. Exit status: 0 on an answer, 1 when the service refuses or fails (an unknown
model too), 2 for a wrong option or a missing token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from dagster_runway.client import DEFAULT_BASE_URL, ModelInfo, ModelPage, RetryPolicy, RunComfyClient
from dagster_runway.errors import RunComfyError

PROG = "dagster-runway models"
_EMULATOR_MISSING = "--emulator needs the emulator extra: pip install 'dagster-runway[emulator]'"


class UsageError(Exception):
    """A wrong option or a missing setting: the message names it and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The models command's arguments: ``[SEARCH]`` or ``show MODEL_ID``."""
    parser.usage = f"{PROG} [SEARCH] [options]\n       {PROG} show MODEL_ID [options]"
    parser.add_argument(
        "words",
        nargs="*",
        metavar="SEARCH | show MODEL_ID",
        help="Text to look for in model ids and names (none: every model); or 'show' and a model id.",
    )
    parser.add_argument("--category", default=None, help="Only models of this category, e.g. image-to-video.")
    parser.add_argument(
        "--limit", type=int, default=20, help="How many models to list (default: %(default)s)."
    )
    parser.add_argument(
        "--offset", type=int, default=0, help="How many to skip, for the next page (default: 0)."
    )
    parser.add_argument("--json", action="store_true", help="Print the catalog's JSON answer as it is.")
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="Ask a local emulator started for this command, not RUNCOMFY_BASE_URL (no token needed).",
    )


def run(args: argparse.Namespace) -> int:
    try:
        show, text = _parse_words(args.words)
        if args.limit < 1 or args.offset < 0:
            raise UsageError(f"--limit {args.limit} must be 1 or more and --offset {args.offset} 0 or more")
        with _client(args.emulator) as client:
            if show:
                return _show(client.model(text), args.json)
            page = client.models(limit=args.limit, offset=args.offset, search=text, category=args.category)
            return _list(page, text, args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RunComfyError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def _parse_words(words: list[str]) -> tuple[bool, str | None]:
    """(whether to show one model, the model id or the search text)."""
    if words[:1] == ["show"]:
        if len(words) != 2:
            raise UsageError(
                f"'show' takes one MODEL_ID, e.g. {PROG} show runwayml/runway-gen-4/turbo/image-to-video"
            )
        return True, words[1]
    if len(words) > 1:
        raise UsageError(f"give one SEARCH text (quote it if it has spaces), got {len(words)} words")
    return False, words[0] if words else None


@contextlib.contextmanager
def _client(emulator: bool) -> Iterator[RunComfyClient]:
    # A command waits less than a pipeline: a few quick retries, then the error.
    retry = RetryPolicy(max_attempts=3, deadline=20.0)
    if not emulator:
        token = os.environ.get("RUNCOMFY_API_TOKEN", "").strip()
        if not token:
            raise UsageError(
                "set RUNCOMFY_API_TOKEN to your RunComfy API key (and RUNCOMFY_BASE_URL for a service other than "
                "RunComfy's), or pass --emulator to ask a local emulator"
            )
        base_url = os.environ.get("RUNCOMFY_BASE_URL") or DEFAULT_BASE_URL
        with RunComfyClient(api_token=token, base_url=base_url, retry=retry) as client:
            yield client
        return
    try:
        from dagster_runway.emulator import Emulator, EmulatorConfig
    except ImportError:
        raise UsageError(_EMULATOR_MISSING) from None
    with (
        Emulator(EmulatorConfig(time_scale=0.0)) as server,
        RunComfyClient(api_token=server.token, base_url=server.base_url, retry=retry) as client,
    ):
        yield client


def _price(model: ModelInfo) -> str:
    if model.base_price_usd is None:
        return "-"
    return f"{model.base_price_usd:g}/{model.price_unit or '?'}"


def _list(page: ModelPage, search: str | None, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(page.model_dump(mode="json"), indent=2))
        return 0
    if not page.models:
        wanted = " and ".join(
            part
            for part in (
                f"match {search!r}" if search else "",
                f"are in {args.category!r}" if args.category else "",
            )
            if part
        )
        print(f"no models {wanted or 'listed'}" + (f" past offset {args.offset}" if args.offset else ""))
        return 0
    rows = [["MODEL ID", "PRICE (USD)", "CATEGORIES", "NAME"]]
    rows += [
        [m.model_id, _price(m), ",".join(m.categories) or "-", m.display_name or "-"] for m in page.models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    total = page.total if page.total is not None else len(page.models)
    first = args.offset + 1
    print(f"\n{first}-{args.offset + len(page.models)} of {total} models", end="")
    more = total - args.offset - len(page.models)
    again = " ".join(
        [PROG, *([repr(search)] if search else []), f"--offset {args.offset + len(page.models)}"]
    )
    print(f"; {again} for the next {min(more, args.limit)}" if more > 0 else "")
    return 0


def _show(model: ModelInfo, as_json: bool) -> int:
    if as_json:
        print(json.dumps(model.model_dump(mode="json"), indent=2))
        return 0
    print(model.model_id + (f"  ({model.display_name})" if model.display_name else ""))
    print(f"price: {_price_sentence(model)}")
    if model.pricing_note:
        print(f"note: {model.pricing_note}")
    if model.categories:
        print(f"categories: {', '.join(model.categories)}")
    if model.model_url:
        print(f"page: {model.model_url}")
    schema = model.input_schema or {}
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        print("input fields: the catalog gives no input schema")
        return 0
    required = set(schema.get("required") or [])
    print("input fields (* required):")
    width = max(len(name) for name in properties) + 2
    for name, field in properties.items():
        field = field if isinstance(field, dict) else {}
        mark = "*" if name in required else " "
        title = field.get("title") or ""
        print(f"  {name.ljust(width)}{mark} {str(field.get('type', '?')).ljust(8)} {title}".rstrip())
        for line in _rules(field):
            print(f"  {' ' * (width + 11)}{line}")
    return 0


def _price_sentence(model: ModelInfo) -> str:
    if model.base_price_usd is None:
        return "not given"
    per = {"second": "second of output video", "output": "output"}.get(
        model.price_unit or "", model.price_unit or "?"
    )
    text = f"{model.base_price_usd:g} USD per {per}"
    durations = ((model.input_schema or {}).get("properties") or {}).get("duration", {}).get("enum")
    if model.price_unit == "second" and isinstance(durations, list):
        examples = [f"{d} s: {model.estimate_usd(d):.2f} USD" for d in durations if isinstance(d, int)]
        text += f" ({', '.join(examples)})" if examples else ""
    return text


def _rules(field: dict[str, Any]) -> list[str]:
    """A field's rules, one line each: choices, bounds, lengths, the service's validations, the default."""
    lines = []
    if isinstance(field.get("enum"), list):
        lines.append("one of: " + ", ".join(map(str, field["enum"])))
    low, high = field.get("minimum"), field.get("maximum")
    if low is not None or high is not None:
        lines.append(f"range: {'' if low is None else low}..{'' if high is None else high}")
    for key, text in (("exclusiveMinimum", "more than {}"), ("exclusiveMaximum", "less than {}"),
                      ("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
                      ("minItems", "at least {} items"), ("maxItems", "at most {} items"), ("format", "format: {}")):  # fmt: skip
        if field.get(key) is not None:
            lines.append(text.format(field[key]))
    for rule in field.get("validations") or []:
        if isinstance(rule, dict):
            check = f"{rule.get('validation_rule', '?')} {rule.get('validation_value', '?')}"
            lines.append(
                f"rule: {check}" + (f" ({rule['validation_error']})" if rule.get("validation_error") else "")
            )
    if field.get("description"):
        lines.append(str(field["description"]))
    if "default" in field:
        default = json.dumps(field["default"])
        lines.append("default: " + (default if len(default) <= 70 else default[:67] + '..."'))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
