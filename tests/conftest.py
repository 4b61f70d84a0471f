import os
import tempfile

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "arrayopt-numba-cache"))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

try:  # float64 oracles on JAX need x64
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass
