"""What a pipeline file says, and checking it: the spec dataclasses (`pipeline`), reading
YAML with positions (`yamlfile`), defaults and profiles (`load`), the rules beyond the JSON
Schema (`checks`), the schema itself (`schema`), and typed params (`params`).

No Airflow, no network, no processes: `dagfactory validate` and DAG parsing run all of it.
"""
