"""Running a pipeline, with no Airflow in sight: the steps of a run (`steps`), the code
from git and its virtualenv (`workspace`), calling the entry point in that virtualenv
(`runner`, `entry_shim`), `dagfactory run` (`command`), and the caches' cleanup (`prune`).
"""
