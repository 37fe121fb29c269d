"""The stage layer: one module per `dvc.yaml` stage (named after it) with its click command, its file I/O and
its MLflow run. Stages call the library modules (`stablesdg.data`, `.diffusion`, `.adaptation`, ...); nothing
in the library imports a stage."""
