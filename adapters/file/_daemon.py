"""The daemon's name, for `{daemon}` in file sink paths: one file per daemon.

Several daemons sharing one config share every key of it, so what tells them apart must come
from outside the config: the environment variable `BUSWAY_DAEMON` if it is set, otherwise the
host name. One daemon per host (a VM, a container, a Kubernetes pod) needs nothing more;
several on one host set `BUSWAY_DAEMON` each (systemd: `Environment=BUSWAY_DAEMON=%i`).

The name should be stable across restarts: a file's id index (what makes redeliveries
harmless) belongs to the file, so a daemon that comes back under a new name starts a new file
whose index does not know what the old one wrote. A Kubernetes Deployment's pod names change
at each restart; a StatefulSet's do not (or set `BUSWAY_DAEMON` from a stable value).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

__all__ = ["ENVIRONMENT_VARIABLE", "daemon_name"]

ENVIRONMENT_VARIABLE = "BUSWAY_DAEMON"
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def daemon_name(environ: Mapping[str, str] | None = None) -> str:
    """`BUSWAY_DAEMON`, else the host name; ValueError if `BUSWAY_DAEMON` is not a safe name."""
    environ = os.environ if environ is None else environ
    given = environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if given:
        if _SAFE.fullmatch(given) is None:
            raise ValueError(
                f"{ENVIRONMENT_VARIABLE}={given[:100]!r} cannot name a file: use 1-100 letters, "
                "digits, '.', '_' or '-', starting with a letter or digit"
            )
        return given
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:100].lstrip("._-")
    return host or "busway"
