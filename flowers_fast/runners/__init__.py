"""One module per pipeline's runner; ``RUNNERS`` maps ``config.PIPELINES`` to them.

A runner takes a ``train.RunContext`` and returns a ``train.RunResult``, through train's shared
steps (fit/evaluate, breakdown, preparation facts). ``train.run`` imports this registry when it
runs, so that the runners can import ``train`` at their top without a cycle.
"""

from __future__ import annotations

from ..train import Runner
from . import cutcache, featcache, modelonly, naive, tfdata, tutorial

RUNNERS = {
    "naive": Runner(naive.run),
    "tutorial": Runner(tutorial.run),
    "tfdata": Runner(tfdata.run),
    "featcache": Runner(featcache.run),
    "cutcache": Runner(cutcache.run),
    "modelonly": Runner(modelonly.run, needs_data=False),
}
