"""The documentation: every file in docs/ is reachable from the README."""
import re

from conftest import ROOT


def test_every_file_in_docs_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    linked = {m.split("#")[0] for m in re.findall(r"\]\((docs/[^)\s]+)\)", readme)}
    files = {f"docs/{p.name}" for p in (ROOT / "docs").iterdir() if p.is_file()}
    assert files and files <= linked, sorted(files - linked)
