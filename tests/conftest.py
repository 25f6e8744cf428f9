"""A GPU run fails if any kernel instantiation fell back to its reference after a failed
self-test: the tests that went through the dispatch would have compared a reference with
itself."""

import os

from clsa_mlx import sparse


def pytest_sessionfinish(session, exitstatus):
    if sparse.fallbacks():
        print("\nkernel self-test fallbacks:", sparse.fallbacks())
        session.exitstatus = 1


# Chats started by the tests keep no input history in the user's home.
os.environ.setdefault("CLSA_MLX_HISTORY", "")
