"""The test processes' own setup (tests/conftest.py), which the rest of the suite relies on."""

import jax
from jax._src import xla_bridge


def test_cpu_dispatch_is_synchronous_for_pallas_interpreter_tests():
    """conftest turns XLA:CPU's asynchronous dispatch off before the client starts: with it on, an interpreted
    kernel's callbacks can deadlock with the next dispatched op (CI hung so). An environment variable does not set
    this flag, which is how a first attempt silently left it on."""
    assert jax.default_backend() != "cpu" or xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value is False
