"""The README's examples run as written, and the installed commands exist."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_python_api_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "48213" in r.stdout  # the shipped model answers the lookup in the example


@pytest.mark.parametrize("command,module", [("clsa-chat", "clsa_mlx.chat"), ("clsa-convert", "clsa_mlx.convert")])
def test_console_scripts_and_modules(command, module):
    exe = shutil.which(command) or str(Path(sys.executable).with_name(command))
    for cmd in ([exe, "--help"], [sys.executable, "-m", module, "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and re.search(r"^Usage: ", r.stdout, re.M), (cmd, r.stderr[-500:])


def test_ci_runs_the_readme_set_up_and_both_lanes():
    """.ci/run installs and tests exactly as the README's set-up says, then runs the e2e lane."""
    setup = (ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2 and commands[0].endswith("python chat.py"), commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci and ci[-1] == "pytest -q -m e2e" and ci.index(commands[1]) < len(ci) - 1


def test_links_in_the_readme_and_docs_lead_to_files_of_the_checkout():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
