"""Kubeflow components: thin typed wrappers, one job each, no algorithm code, generic over learners.

``common`` holds the steps around meta-training (prepare_data, check_new_data, start_tracking,
meta_test, register_and_promote, report_skipped, finish_tracking); ``learner`` the outer-step
components (init, block, ask, evaluate, tell); ``trainjob`` the distributed meta-training step.
Their bodies call ``runtime`` (data, meta-test, registry), ``outer_steps`` (meta-training),
``lineage`` (the MLflow run of a pipeline run) and ``trainjob_runtime`` at run time.
"""

__all__: list[str] = []
