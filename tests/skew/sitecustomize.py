"""Loaded by worker subprocesses of the clock-skew test (PYTHONPATH=tests/skew): the process's wall
clock is off by PGQ_TEST_SKEW seconds. pgq must not care, because it never compares Python's time
with the database's."""

import os
import time

_skew = float(os.environ.get("PGQ_TEST_SKEW", "0"))
_real_time = time.time
time.time = lambda: _real_time() + _skew
