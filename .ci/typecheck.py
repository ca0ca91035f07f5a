"""mypy over the installed layout: flows/, tasks/ and models/ are checked as pivotmap.flows, ….

pyproject's `package-dir` installs those folders as subpackages of `pivotmap`, through an
editable-install import hook that mypy cannot follow; so this names each source module the way
it is imported, and `pivotmap.tasks.storage` resolves to tasks/storage.py. Options and exit
status are mypy's; `[tool.mypy]` in pyproject.toml gives the files and settings. Check the whole
set (no file arguments): a first-party module left out of the sources cannot be found.
"""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

from mypy import util
from mypy.fscache import FileSystemCache
from mypy.main import process_options, run_build
from mypy.modulefinder import BuildSource

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def package_of_folder(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """Repository folder -> the package it installs as, e.g. {"tasks": "pivotmap.tasks"}."""
    mapping = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {folder: package for package, folder in mapping.items() if folder != package}


def as_installed(source: BuildSource, packages: dict[str, str]) -> BuildSource:
    """`tasks.storage` (found on disk) -> `pivotmap.tasks.storage` (as imported)."""
    head, dot, rest = (source.module or "").partition(".")
    if head not in packages:
        return source
    return BuildSource(source.path, packages[head] + dot + rest, source.text, source.base_dir)


def main(args: list[str]) -> int:
    t0 = time.time()
    fscache = FileSystemCache()
    sources, options = process_options(args, fscache=fscache)
    packages = package_of_folder()
    sources = [as_installed(source, packages) for source in sources]
    _, messages, blockers = run_build(sources, options, fscache, t0, sys.stdout, sys.stderr)
    n_errors, _, n_files = util.count_stats(messages)
    if n_errors:
        print(f"Found {n_errors} errors in {n_files} files (checked {len(sources)} source files)")
    else:
        print(f"Success: no issues found in {len(sources)} source files")
    sys.stdout.flush()
    code = (2 if blockers else 1) if n_errors else 0
    if options.fast_exit:
        util.hard_exit(code)  # as mypy does: freeing the build's objects takes minutes
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
