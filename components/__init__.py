"""Kubeflow components: thin typed wrappers, one job each, no algorithm code, generic over learners.

``common`` holds the steps around meta-training (prepare_data, check_new_data, start_tracking,
meta_test, register_and_promote, report_skipped); ``learner`` the outer-step components (init,
block, ask, evaluate, tell); ``runtime`` is what their bodies call at run time.
"""

__all__: list[str] = []
