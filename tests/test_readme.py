"""README's commands are the ones CI runs, so they stay true on a fresh machine."""

import re

from tests.harness import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()


def test_ci_runs_the_tests_in_a_fresh_clone():
    ci = (REPO / ".ci" / "run").read_text()
    assert "git clone" in ci and 'cd "$work/appliance"' in ci


def test_tests_read_nothing_outside_the_repository():
    # The specs the tests validate against live in tests/reference (see its README for their source).
    assert (REPO / "tests" / "reference" / "openai-openapi-subset.json").is_file()
    assert (REPO / "tests" / "reference" / "compose-spec.json").is_file()
    outside = re.compile(r"\.\./shared|REPO\.parent|parents\[2\]")
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("*.py")
        if outside.search(path.read_text())
    ]
    assert offenders == []
