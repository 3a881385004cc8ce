from tests.util import one_thread  # noqa: F401 - autouse for every kernel test
