"""The deploy tests start real servers with the service tests' fixtures (port 0, a test-double guard)."""
from tests.service.conftest import clean_images, flagged_images, guard, make_server  # noqa: F401 (fixtures)
