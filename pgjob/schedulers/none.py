"""Outside any batch system: the host's own name, the machine's (or cgroup's) memory, no
end, and nothing pgjob could submit to or renew."""
from __future__ import annotations

from .base import Scheduler


class NoScheduler(Scheduler):
    name = "none"
