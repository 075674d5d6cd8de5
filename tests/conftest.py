import os
import sys

# Spawned ranks unpickle test bodies by module name: keep tests/ (dist.py) and tests/gpu (the GPU
# tests' shared helpers, `from common import ...`) importable, in children too (spawn copies sys.path).
_HERE = os.path.dirname(__file__)
for _path in (os.path.join(_HERE, "gpu"), _HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the built extension (skipped otherwise)")
