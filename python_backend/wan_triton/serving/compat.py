"""Keep an unusable scipy from breaking diffusers inside Triton's Python-backend stub.

The stub needs numpy<2 (numpy 2 gave empty tensors), but a host's scipy may be built for numpy 2; importing it
then fails with AttributeError, and diffusers imports scipy.stats whenever scipy is installed (for sigma schedules
this project does not use). If scipy cannot be imported here, it is marked absent so diffusers skips it.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def hide_unusable_scipy() -> None:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        return
    except Exception as exc:  # noqa: BLE001 - a scipy built for another numpy fails in assorted ways
        for name in [m for m in sys.modules if m == "scipy" or m.startswith("scipy.")]:
            del sys.modules[name]
        # importlib.util.find_spec("scipy") returns None for a None entry, so diffusers sees no scipy.
        sys.modules["scipy"] = None  # type: ignore[assignment]
        logger.warning("scipy is installed but unusable with this numpy (%s); continuing without it", exc)
