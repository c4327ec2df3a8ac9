"""The steps around meta-training, the same for every learner: data, the new-data check,
tracking (start, and the exit step that ends the MLflow run), meta-test, registration/promotion and
the "skipped" report (``learner``: a registered
name or an import reference, as in :mod:`components.learner`).

Every component runs in the project's image (``base_image``), installs nothing at run time and
imports what it needs inside its body (Kubeflow ships only the function's source); the body is one
call into :mod:`components.runtime`, which calls one ``metaopt_core`` function.

(No ``from __future__ import annotations`` in the component modules: KFP reads the parameter
annotations as types when the decorator runs.)
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(
    learner: str,
    config: dict,
    data: Output[Dataset],
    config_uri: str = "",
    meta_test_settings: dict = {},  # noqa: B006 (KFP reads the default into the component spec; never mutated)
) -> NamedTuple("PreparedOutputs", [("fingerprint", str), ("config", str), ("summary", str)]):
    """Resolve the run configuration (``config_uri`` if set, else ``config``) and prepare the data
    meta-training and the meta-test read, with the split manifest that proves them disjoint (an
    overlap fails here, before any training); the Dataset artifact carries the content fingerprint
    in its metadata. The resolved configuration goes on as JSON text (a KFP dict parameter cannot hold null)."""
    from collections import namedtuple

    from components import runtime

    fingerprint, resolved, summary = runtime.prepare_data(learner, config, config_uri, data, meta_test_settings)
    return namedtuple("PreparedOutputs", ["fingerprint", "config", "summary"])(fingerprint, resolved, summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_new_data(
    fingerprint: str,
    model_name: str,
    force: bool = False,
    config: str = "",
) -> NamedTuple("CheckOutputs", [("should_train", bool), ("production_version", str), ("production_fingerprint", str), ("reason", str)]):
    """Meta-train only if forced, or if (data fingerprint, hash of the resolved ``config``) differs
    from that of the last meta-training run of the model that finished (MLflow), promoted or not."""
    from collections import namedtuple

    from components import runtime

    should, version, recorded, reason = runtime.check_new_data(fingerprint, model_name, force, config)
    return namedtuple("CheckOutputs", ["should_train", "production_version", "production_fingerprint", "reason"])(should, version, recorded, reason)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_tracking(
    learner: str,
    config: str,
    data: Input[Dataset],
    fingerprint: str,
    model_name: str,
    experiment: str = "metaopt",
    pipeline_run: str = "",
    kfp_run_id: str = "",
) -> NamedTuple("TrackingOutputs", [("run_id", str), ("experiment_id", str), ("tracking_uri", str)]):
    """One MLflow run per pipeline run (or the one MLFLOW_RUN_ID names; a retry reuses the run of
    ``kfp_run_id``): config params, the data fingerprint, the KFP run's id and page as tags, the
    inputs manifest. Later steps log into it by run id; it stays RUNNING until the exit step."""
    from collections import namedtuple

    from components import lineage

    run_id, experiment_id, uri = lineage.start_tracking(learner, config, data, fingerprint, experiment, model_name, pipeline_run, kfp_run_id)
    return namedtuple("TrackingOutputs", ["run_id", "experiment_id", "tracking_uri"])(run_id, experiment_id, uri)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_tracking(status: dsl.PipelineTaskFinalStatus, kfp_run_id: str) -> str:
    """The pipeline's exit step (dsl.ExitHandler): end the MLflow run of ``kfp_run_id`` FINISHED
    when every step succeeded, FAILED when one failed (KILLED when cancelled). Returns the lineage
    (KFP run id and page, MLflow run id, page and status) as JSON."""
    from components import lineage

    error = getattr(status, "error_message", None) or ""
    return lineage.finish_tracking(status.state, kfp_run_id, error)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def meta_test(
    learner: str,
    config: str,
    data: Input[Dataset],
    learned: Input[Model],
    run_id: str,
    report: Output[Markdown],
    plots: Output[HTML],
    metrics: Output[Metrics],
    gate_inputs: Output[Artifact],
    settings: dict = {},  # noqa: B006 (KFP reads the default into the component spec; never mutated)
    device: str = "",
    model_name: str = "",
) -> NamedTuple("MetaTestOutputs", [("scores", dict), ("metric", str), ("greater_is_better", bool)]):
    """Meta-test the learned loss/optimiser, the production version of ``model_name`` (re-evaluated
    in the same run) and tuned baselines on held-out data: a Markdown table, plots (HTML), the
    scores (as Metrics and as a dict for registration), the registry metric, and the paired scores
    the promotion gate decides on (``gate_inputs``, JSON)."""
    from collections import namedtuple

    from components import runtime

    values, metric, greater = runtime.meta_test(learner, config, data.path, learned.path, run_id, settings, device, report, plots, metrics,
                                                model_name, gate_inputs)  # fmt: skip
    return namedtuple("MetaTestOutputs", ["scores", "metric", "greater_is_better"])(values, metric, greater)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_and_promote(
    learner: str,
    config: str,
    learned: Input[Model],
    fingerprint: str,
    run_id: str,
    model_name: str,
    scores: dict,
    metric: str,
    greater_is_better: bool,
    gate_inputs: Input[Artifact],
    report: Output[Markdown],
    registered: Output[Model],
    margin: float = 0.0,
    kfp_run_id: str = "",
) -> NamedTuple("RegistrationOutputs", [("version", str), ("decision", str), ("promoted", bool), ("production_version", str), ("summary", str)]):
    """Register a new version (white-box artifact, provenance, scores) and let the promotion gate
    decide from the same meta-test run: promoted if it beats the re-evaluated production version by
    at least ``margin`` (paired bootstrap lower bound over tasks x seeds) and is not worse than the
    best tuned baseline by more than ``margin``; a rejected version stays registered with its reason.
    A retry reuses the version tagged with ``kfp_run_id``. ``registered``: the registered files, with
    ``models:/<name>/<version>`` (``model_uri``) and the MLflow run in its metadata."""
    from collections import namedtuple

    from components import runtime

    outcome = runtime.register_and_promote(learner, config, learned.path, fingerprint, run_id, model_name, scores, metric,
                                           greater_is_better, margin, report, gate_inputs.path, kfp_run_id, registered)  # fmt: skip
    return namedtuple("RegistrationOutputs", ["version", "decision", "promoted", "production_version", "summary"])(*outcome)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report_skipped(
    learner: str,
    model_name: str,
    production_version: str,
    fingerprint: str,
    reason: str,
    report: Output[Markdown],
) -> NamedTuple("SkippedOutputs", [("summary", str)]):
    """The data has not changed: say so, and which version stays in production."""
    from collections import namedtuple

    from components import runtime

    summary = runtime.report_skipped(learner, model_name, production_version, fingerprint, reason, report)
    return namedtuple("SkippedOutputs", ["summary"])(summary)


__all__ = ["check_new_data", "finish_tracking", "meta_test", "prepare_data", "register_and_promote", "report_skipped", "start_tracking"]
