"""The README's generated parts stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from dagster_runway.pipeline.config import options_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_options_table_is_generated_from_the_config_model() -> None:
    block = re.search(r"<!-- options:start -->\n(.*?)\n<!-- options:end -->", README.read_text(), re.S)
    assert block is not None, "README.md lost its options markers"
    assert block.group(1) == options_table(), (
        "README.md's option table is out of date: regenerate it from "
        "dagster_runway.pipeline.config.options_table()"
    )
