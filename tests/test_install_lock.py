"""requirements/lock.txt: the pinned test environment that `make venv` installs (no network).

The lock must pin every requirement of pyproject's `dependencies` and `test` extra to a version
inside its range, pin each package once, and the running environment must be the locked one
(so a venv that drifted from the lock fails here rather than somewhere obscure).
"""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _lock_lines() -> list[str]:
    return [ln.strip() for ln in LOCK.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def _lock() -> dict[str, Version]:
    return {canonicalize_name(m.group(1)): Version(m.group(2))
            for m in map(PIN.match, _lock_lines()) if m}


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_every_line_is_an_exact_pin_and_each_name_appears_once():
    lines = _lock_lines()
    assert lines, f"{LOCK} pins nothing"
    bad = [ln for ln in lines if not PIN.match(ln)]
    assert not bad, f"not of the form name==version: {bad}"
    names = [canonicalize_name(PIN.match(ln).group(1)) for ln in lines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"pinned more than once: {dupes}"
    assert "genrecal" not in names, "the lock must not pin genrecal itself"


def test_pyproject_requirements_are_pinned_inside_their_ranges():
    lock = _lock()
    missing = [str(r) for r in _pyproject_requirements() if canonicalize_name(r.name) not in lock]
    assert not missing, f"in pyproject.toml but not in {LOCK.name}: {missing} (run `make lock`)"
    outside = [f"{r} (locked {lock[canonicalize_name(r.name)]})" for r in _pyproject_requirements()
               if not r.specifier.contains(lock[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"locked outside pyproject's range: {outside} (run `make lock`)"


def test_requires_python_admits_no_python_a_locked_package_refuses():
    """pyproject's requires-python may not promise a Python that a locked dependency refuses
    (compressed-tensors 0.20 needs 3.11: a promise of 3.10 would fail at install time)."""
    floor = re.fullmatch(r">=(\d+\.\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())
                         ["project"]["requires-python"])
    assert floor, "requires-python is expected as '>=X.Y'"
    refused = {}
    for name in _lock():
        try:
            needs = metadata.metadata(name).get("Requires-Python")
        except metadata.PackageNotFoundError:  # pinned for another platform or not installed
            continue
        if needs and not SpecifierSet(needs).contains(floor[1]):
            refused[name] = needs
    assert not refused, f"requires-python {floor[0]} admits Pythons these refuse: {refused}"


def test_torch_is_the_cpu_build():
    assert _lock()["torch"].local == "cpu", "the lock must pin torch's CPU build (torch==X+cpu)"


def test_lock_header_names_its_environment():
    header = [ln for ln in LOCK.read_text().splitlines() if ln.startswith("# environment: ")]
    assert len(header) == 1, "the lock needs one '# environment: ' line (written by `make lock`)"
    impl, pyver, plat, machine = header[0].split(": ", 1)[1].split()
    assert impl and plat and machine and re.fullmatch(r"\d+\.\d+", pyver)


def _is_lock_environment() -> bool:
    header = next(ln for ln in LOCK.read_text().splitlines() if ln.startswith("# environment: "))
    here = (platform.python_implementation(), "%d.%d" % sys.version_info[:2], sys.platform,
            platform.machine())
    return header.split(": ", 1)[1].split() == list(here)


def test_installed_environment_matches_the_lock():
    """Every locked package (pyproject's direct requirements and all transitive ones) is
    installed at exactly its locked version."""
    if not _is_lock_environment():
        pytest.skip("this interpreter is not the environment the lock was made for")
    lock = _lock()
    drift = []
    for name, version in sorted(lock.items()):
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: locked {version}, not installed")
            continue
        if installed != version:
            drift.append(f"{name}: locked {version}, installed {installed}")
    assert not drift, ("the environment drifted from requirements/lock.txt (reinstall it: "
                       "rm .venv/.genrecal-installed && make venv): " + "; ".join(drift))
