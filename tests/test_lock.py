"""The lock files agree with pyproject.toml: every dependency of an environment is pinned in its
lock (requirements/*.txt, written by `bash .ci/setup lock`) at a version its range allows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

ROOT = Path(__file__).parents[1]
#: lock file -> the extras it installs on top of the runtime dependencies
LOCKS = {"runtime.txt": [], "dev.txt": ["dev"], "vision.txt": ["dev", "vision"]}


def pins(lock: Path) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[canonicalize_name(m[1])] = m[2]
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_dependency_is_pinned_in_range(lock):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in LOCKS[lock]:
        wanted += project["optional-dependencies"][extra]
    pinned = pins(ROOT / "requirements" / lock)
    env = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux"}
    problems = []
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # e.g. tomli on Python < 3.11: the locks are for 3.11
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req.name}=={pinned[name]} is outside {req.specifier}")
    assert problems == [], (
        f"requirements/{lock} is out of date with pyproject.toml: {problems}; run "
        "bash .ci/setup lock and commit requirements/"
    )


def test_torch_is_pinned_without_a_build_tag():
    """So that ATTNPATCH_TORCH_INDEX picks the build (CPU or CUDA) of the locked version."""
    for lock in LOCKS:
        version = pins(ROOT / "requirements" / lock)["torch"]
        assert "+" not in version, (lock, version)
    assert pins(ROOT / "requirements" / "dev.txt")["torch"] == "2.13.0"
