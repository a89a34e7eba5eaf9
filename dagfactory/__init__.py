"""dagfactory: data pipelines from YAML, run on Airflow 3 and Dask.

The folders follow a pipeline file's way:

- `spec/`     what a pipeline file says, and checking it (`dagfactory validate`, the schema);
- `dag/`      the Airflow side: a spec becomes a DAG, whose tasks call `run.steps`;
- `run/`      running a pipeline without Airflow: code from git, its virtualenv, the entry
              point, `dagfactory run`;
- `backends/` the Dask clusters a run starts and stops (local, existing, fargate);
- `cli.py`    the `dagfactory` command; `errors.py` the exceptions a user can see.
"""
