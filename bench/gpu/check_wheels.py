"""Do the carried wheels (.whl/) complete the GPU machine's Python? Every requirement of every wheel must be met.

    python -m bench.gpu.check_wheels .whl --image bench/gpu/image-packages.txt   here, before carrying them
    python -m bench.gpu.check_wheels .whl --installed                            there, after installing them

A wheel's Requires-Dist lines count without extras, their markers evaluated for CPython 3.12 on Linux x86-64 (with
--installed: for the running interpreter). A requirement is met by another carried wheel of a matching version, or
by the image: by name in image-packages.txt (and by version where that list knows it), or by the distribution
installed there (--installed). Also refused: two wheels of one package (pip would stop the whole install) and a wheel
that CPython 3.12 on manylinux x86-64 cannot install. Exit status 1 when anything is wrong; each problem is printed.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "platform_system": "Linux", "sys_platform": "linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def wheel_requirements(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        metadata = Parser().parsestr(wheel.read(name).decode())
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def installable_on_target(path: Path) -> bool:
    _, _, _, tags = parse_wheel_filename(path.name)
    return any(tag.interpreter in ("py3", "py312", "cp312") and tag.abi in ("none", "abi3", "cp312")
               and (tag.platform == "any" or re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", tag.platform))
               for tag in tags)


def read_image_list(path: Path) -> dict[str, Version | None]:
    """name -> version (None where the list does not say)."""
    packages: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def installed_version(name: str) -> Version | None | str:
    """The installed distribution's version, or "absent"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Version(version(name))
    except PackageNotFoundError:
        return "absent"


def check(wheel_dir: Path, image: dict[str, Version | None] | None) -> tuple[list[str], list[str]]:
    """(problems, notes). image None: check against the running interpreter's installed distributions."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    problems, notes = [], []
    carried: dict[str, Version] = {}
    for path in wheels:
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in carried:
            problems.append(f"{name}: two wheels ({carried[name]} and {version}); keep one")
        carried[name] = version
        if not installable_on_target(path):
            problems.append(f"{path.name}: not installable by CPython 3.12 on manylinux x86-64")
        if image is not None and name in image:
            notes.append(f"{name} {version}: the image has it too ({image[name] or 'version unknown'}); the carried "
                         "one comes first on PYTHONPATH")
    for path in wheels:
        owner = parse_wheel_filename(path.name)[0]
        for req in wheel_requirements(path):
            if req.marker is not None and not req.marker.evaluate(TARGET if image is not None else {"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in carried:
                have, where = carried[name], "carried"
            elif image is None:
                have, where = installed_version(name), "installed"
            elif name in image:
                have, where = image[name], "image"
            else:
                have, where = "absent", "image"
            if have == "absent":
                problems.append(f"{owner} needs {req}: neither carried nor in the image")
            elif have is None:
                if req.specifier:
                    notes.append(f"{owner} needs {req}: the image has {name}, version not listed")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{owner} needs {req}: {where} {name} is {have}")
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel_dir", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", type=Path, help="the image's package list (bench/gpu/image-packages.txt)")
    where.add_argument("--installed", action="store_true", help="check against this interpreter's packages")
    args = parser.parse_args(argv)
    wheels = sorted(args.wheel_dir.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.wheel_dir}")
        return 1
    problems, notes = check(args.wheel_dir, None if args.installed else read_image_list(args.image))
    for path in wheels:
        print(f"  {path.name} ({path.stat().st_size / 2**20:.2f} MiB)")
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    total = sum(p.stat().st_size for p in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB: " + ("requirements met" if not problems else
                                                        f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
