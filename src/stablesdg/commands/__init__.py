"""Commands that are not `dvc.yaml` stages: the registry's alias moves, the ablation, the surface-corpus
pretraining of the backbone and the feature net, and the provenance check of an ONNX file. Like the stages,
they do the I/O, MLflow and click around the library modules."""
