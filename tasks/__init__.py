"""The steps of the chain: plain functions on xarray/numpy/pystac objects, thin Prefect wrappers."""
