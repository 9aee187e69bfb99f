"""Extension packaging as Slicer 5.8+ expects: the JSON catalog entry (validated against the
schema of Slicer's own Schemas/ folder), declared dependencies, links that resolve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slicer_box import REFERENCE, VERSIONS

ROOT = Path(__file__).resolve().parents[3]
ENTRY = ROOT / "MSKdeX.json"
REPO = "https://github.com/mskdex/SlicerMSKdeX"


def _cmake_vars() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'set\((EXTENSION_[A-Z]+) "([^"]*)"\)', text))


@pytest.mark.parametrize("version", VERSIONS)
def test_catalog_entry_is_valid_for_the_extensions_index(version):
    jsonschema = pytest.importorskip("jsonschema")
    schemas = sorted((REFERENCE / version / "Schemas").glob("slicer-extension-catalog-entry-schema-*.json"))
    if not schemas:
        pytest.skip(f"Slicer {version} schemas not found in {REFERENCE}")
    schema = json.loads(schemas[-1].read_text(encoding="utf-8"))
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    jsonschema.validate(entry, schema)
    assert entry["$schema"].split("#")[0].endswith(schemas[-1].name)  # the schema it says it follows
    # an entry that breaks the schema is refused (the validation is real)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**entry, "depends": "PyTorch"}, schema)


def test_dependencies_are_declared_in_both_places():
    """The PyTorch extension is a dependency: CMake's EXTENSION_DEPENDS and the catalog entry."""
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == ["PyTorch"]
    assert _cmake_vars()["EXTENSION_DEPENDS"].split() == entry["build_dependencies"]
    assert entry["scm_url"].removesuffix(".git") == REPO


def test_links_resolve_to_files_of_this_repository():
    """Homepage (the documentation link), icon and screenshots point at files that exist here."""
    v = _cmake_vars()
    urls = [v["EXTENSION_HOMEPAGE"], v["EXTENSION_ICONURL"], *v["EXTENSION_SCREENSHOTURLS"].split()]
    for url in urls:
        m = re.match(rf"(?:{REPO}/blob/main/|https://raw.githubusercontent.com/mskdex/SlicerMSKdeX/main/)(.+)$", url)
        assert m, url
        assert (ROOT / m.group(1)).is_file(), url
    assert v["EXTENSION_HOMEPAGE"].endswith("docs/slicer.md")
