"""Keep unusable optional packages from breaking diffusers and transformers inside Triton's Python-backend stub.

The stub needs numpy<2 (numpy 2 gave empty tensors), but a host's scipy may be built for numpy 2; importing it
then fails, and so does scikit-learn, which imports scipy. diffusers and transformers import both whenever they
are installed (for features this project does not use). A package that is installed but cannot be imported here is
marked absent, so those libraries skip it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

# In dependency order: scikit-learn fails once scipy is hidden.
OPTIONAL = ("scipy", "sklearn")


def hide_unusable_packages(names: tuple[str, ...] = OPTIONAL) -> list[str]:
    hidden = []
    for name in names:
        if name in sys.modules and sys.modules[name] is None:
            continue
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
            if name == "scipy":
                importlib.import_module("scipy.stats")
        except Exception as exc:  # noqa: BLE001 - a package built for another numpy fails in assorted ways
            for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[module]
            # importlib.util.find_spec returns None for a None entry, so the libraries see the package as absent.
            sys.modules[name] = None  # type: ignore[assignment]
            hidden.append(name)
            logger.warning("%s is installed but unusable here (%s); continuing without it", name, exc)
    return hidden
