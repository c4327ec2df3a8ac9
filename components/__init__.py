"""Kubeflow components: thin typed wrappers, one job each, no algorithm code.

``common`` holds the steps every pipeline shares (prepare_data, check_new_data, start_tracking,
meta_test, register_and_promote, report_skipped); ``arl``, ``itl`` and ``metamd`` hold each
algorithm's outer-step components; ``runtime`` is what their bodies call at run time.
"""
