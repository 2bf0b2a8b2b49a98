"""Make the repository's source directories importable in tests without installing them."""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent

# Inserted in reverse so python_backend ends up first on sys.path.
for _directory in ("client", "build", "python_backend"):
    _path = str(_REPO / _directory)
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)
