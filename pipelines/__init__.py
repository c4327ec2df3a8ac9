"""The pipeline application: the pipeline builder, local and cluster runners, and the ``metaopt`` CLI."""

__all__: list[str] = []
