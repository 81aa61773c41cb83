"""Which spin-fast made a result: the release and a digest of the sources that ran.

Every stage manifest and checkpoint records it, and so does each start of a run (run_dir/sessions.jsonl), so
that resuming a run with other code (an upgrade, a local edit) is said, not silent: the finished stages stay
as the old code made them, and a run whose stages come from different code may not be reproducible.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import spin_kernels
from spin_fast import __version__


@functools.cache
def code_version() -> str:
    """'<release>+<digest of the .py files of spin_fast and spin_kernels>', e.g. '0.1.0+3f2a9c1d07be'."""
    packages = {"spin_fast": Path(__file__).parent, "spin_kernels": Path(spin_kernels.__file__).parent}
    return f"{__version__}+{sources_digest(packages)}"


def sources_digest(packages: dict[str, Path]) -> str:
    """12 hex digits over every .py file of the packages ({name: folder}): its package, relative path and
    bytes. The package's name, not its folder's, counts: spin_kernels' sources live in kernels/."""
    digest = hashlib.blake2b(digest_size=6)
    for package, folder in sorted(packages.items()):
        for path in sorted(folder.rglob("*.py")):
            name = f"{package}/{path.relative_to(folder).as_posix()}"
            digest.update(len(name).to_bytes(8, "little") + name.encode())
            data = path.read_bytes()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()
