"""The Airflow side: a spec becomes a DAG (`build`), whose tasks (`operators`) are thin
wrappers around `dagfactory.run.steps`. The only package that imports Airflow.
"""
