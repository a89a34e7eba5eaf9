"""Example pipeline code: count words over a corpus, in parallel on a Dask cluster."""
