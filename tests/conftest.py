import os
import sys

# Spawned ranks unpickle test bodies by module name: keep tests/ importable in children too.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the built extension (skipped otherwise)")
