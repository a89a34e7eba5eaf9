"""Airflow DAG loader: one DAG per pipeline YAML file in $DAGFACTORY_PIPELINES_DIR.

Airflow's DAG processor (in safe mode it looks for the words "airflow" and "dag" in a file)
imports this module; every DAG it defines is a module-level global.
"""

from pathlib import Path

from dagfactory.dag.build import build_dags

globals().update(build_dags(Path(__file__).resolve().parent.parent / "pipelines"))
