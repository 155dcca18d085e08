"""medzero: training-free, zero-shot medical image classification as a service."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medzero")
except PackageNotFoundError:   # run from a source tree that was never installed
    __version__ = "0+unknown"
