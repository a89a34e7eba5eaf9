"""Example pipeline code: synthetic sales data, prepared, modelled and reported on Dask."""
