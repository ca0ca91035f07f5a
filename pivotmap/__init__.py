"""pivotmap: operational land-cover maps from Sentinel-1 and Sentinel-2."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pivotmap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
