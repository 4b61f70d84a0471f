"""Suite-wide settings.

Long property runs are marked ``@pytest.mark.slow``: the 10k-step float32 and 2k-step
bfloat16 stability runs and the bit-for-bit checks of the unrolled band kernels that no
other test compiles (b = 5..8, and b = 5 in float64), about half of a cold run's Numba
compilation. They run by default (the README's command, which CI runs, runs everything);
``python -m pytest -m "not slow"`` leaves them out for a quick local run.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# The test folders (support/, core/, one per optimizer and area) are not packages: each is put
# on sys.path, so shared helpers (support/_arrays.py, support/records.py, a record module in an
# optimizer's folder) import by their module name, whichever folder pytest was pointed at.
# Module names are therefore unique across the folders (tests/repo/test_layout.py checks it).
_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "arrayopt-numba-cache"))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True)
# CI (CI=true) draws the same examples on every run, so a submission's result does not
# depend on the draw; local runs keep exploring new ones.
settings.register_profile(
    "ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

try:  # float64 oracles on JAX need x64
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass


def free_jax_compilations() -> None:
    """Drop JAX's compiled executables. Each new shape, dtype or tree structure (hypothesis
    draws many) compiles and keeps one; over the suite they held about 2.5 GB of the peak."""
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()


@pytest.fixture(autouse=True, scope="module")
def _free_jax_compilations_after_each_module():
    # per module, not per test: tests of one module share shapes, and recompiling them
    # after every test cost more CPU time than the whole Numba saving of the slow marks
    yield
    free_jax_compilations()

