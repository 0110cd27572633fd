"""Warnings attributed to the user's line: the first stack frame outside lmport."""

from __future__ import annotations

import os
import sys
import warnings

_CORE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _own_folders() -> tuple[str, ...]:
    from . import plugins  # builtin plugins: core/plugins in a wheel, plugins/ in the source tree

    return _CORE, os.path.dirname(os.path.abspath(plugins.__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` pointing at the first caller outside lmport's own code.

    Unlike a fixed ``stacklevel``, this stays right however deep inside lmport the warning is raised.
    """
    own = _own_folders()
    frame = sys._getframe(1)
    level = 2  # warnings.warn's stacklevel of warn_user's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(own):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
