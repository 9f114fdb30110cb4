"""Runner of the ``distillpp batch`` subprocess tests (``python tests/batch_helpers.py ARGS``, or under
``torchrun``): executes ``distillpp batch ARGS``, sleeping ``DISTILLPP_TEST_DELAY`` seconds before
each pipeline call when that variable is set, so a test can kill a run midway."""

from __future__ import annotations

import os
import sys
import time


def slow_pipelines(delay: float) -> None:
    """Make every pipeline that ``distillpp.batch`` loads sleep ``delay`` seconds per call."""
    import distillpp.batch as batch

    load = batch.load_pipeline

    class Slow:
        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def __call__(self, *args, **kwargs):
            time.sleep(delay)
            return self._pipe(*args, **kwargs)

    batch.load_pipeline = lambda *args, **kwargs: Slow(load(*args, **kwargs))


if __name__ == "__main__":
    if os.environ.get("DISTILLPP_TEST_DELAY"):
        slow_pipelines(float(os.environ["DISTILLPP_TEST_DELAY"]))
    from distillpp.cli import main

    sys.exit(main(["batch", *sys.argv[1:]]))
