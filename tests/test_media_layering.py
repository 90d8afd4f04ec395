"""The media layer's contract with the rest of the package: what it may import."""

from __future__ import annotations

import ast
from pathlib import Path

import dagster_runway.media as media

ALLOWED_PACKAGE_MODULES = {
    "dagster_runway.schema",
    "dagster_runway.models",
    "dagster_runway._redact",
    "dagster_runway._process",
    "dagster_runway.retry",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_media_imports_no_dagster_client_or_emulator() -> None:
    files = sorted(Path(media.__file__).parent.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top != "dagster", f"{path.name} imports {name}"
            if top == "dagster_runway":
                assert name in ALLOWED_PACKAGE_MODULES, f"{path.name} imports {name}"


def test_public_api_is_exported() -> None:
    for name in media.__all__:
        assert hasattr(media, name), name
    for name in (
        "ImageSource",
        "validate_image",
        "service_image_url",
        "store_video",
        "probe_video",
        "extract_poster",
        "partition_key_for",
        "derive_seed",
        "resolve_auto_ratio",
        "sha256_of",
        "content_sha256",
    ):
        assert name in media.__all__
