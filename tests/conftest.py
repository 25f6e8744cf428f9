"""The test run's environment, and a GPU run fails if any kernel instantiation fell back to its
reference after a failed self-test (the tests that went through the dispatch would have compared
a reference with itself)."""

import os
import tempfile

# Chats started by the tests keep no input history in the user's home, and their documents in a
# folder of this run (set before anything imports clsa_mlx.prefix_cache).
os.environ.setdefault("CLSA_MLX_HISTORY", "")
os.environ.setdefault("CLSA_MLX_DOCUMENT_CACHE", tempfile.mkdtemp(prefix="clsa-mlx-documents-"))

from clsa_mlx import sparse  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if sparse.fallbacks():
        print("\nkernel self-test fallbacks:", sparse.fallbacks())
        session.exitstatus = 1

