"""ema-tool: the ``ema-tool`` binary, installed by this wheel into the scripts directory.

``python -m ema_tool ARGS`` runs it with ARGS, for environments whose scripts directory is
not on ``PATH``; :func:`find_ema_tool_bin` says where it is.
"""

import os
import shutil
import sys
import sysconfig

__all__ = ["find_ema_tool_bin"]

_EXE = "ema-tool" + (sysconfig.get_config_var("EXE") or "")


def find_ema_tool_bin() -> str:
    """Return the path of the ``ema-tool`` binary that this package installed."""
    candidates = [sysconfig.get_path("scripts")]
    user_scheme = _user_scheme()
    if user_scheme is not None:
        candidates.append(sysconfig.get_path("scripts", scheme=user_scheme))
    # A virtual environment's interpreter sits beside its scripts (bin/ or Scripts/).
    candidates.append(os.path.dirname(sys.executable))
    for directory in candidates:
        path = os.path.join(directory, _EXE)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(_EXE)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"ema-tool: cannot find the {_EXE} binary (looked in {', '.join(candidates)} and PATH)"
    )


def _user_scheme():
    # `pip install --user` puts scripts in the user scheme's directory.
    if sys.version_info >= (3, 10):
        scheme = sysconfig.get_preferred_scheme("user")
    elif os.name == "nt":
        scheme = "nt_user"
    elif sys.platform == "darwin" and sys._framework:
        scheme = "osx_framework_user"
    else:
        scheme = "posix_user"
    return scheme if scheme in sysconfig.get_scheme_names() else None
