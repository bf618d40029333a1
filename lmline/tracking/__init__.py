"""The one place that talks to MLflow, by concern; import the module you use
(`from lmline.tracking import registry`), so a reader sees where each function lives:

- store: where the tracking store is (`tracking_uri`), whether its server answers, a client on it
- runs: stage and pipeline runs, their params, metrics, history and logged model; closing runs left by dead processes
- lineage: the git and DVC facts a run is tagged with, Prefect flow run links, a version's lineage
- plots: the dvc.yaml plots as matplotlib images on a stage's run
- registry: aliases, version tags, registering the produced models, `models:/` URIs, model cards

Inside the package imports go one way: store <- lineage <- runs <- registry, and plots <- runs.
"""
