"""The steps around meta-training, the same for every learner: data, the new-data check,
tracking, meta-test, registration/promotion and the "skipped" report (``learner``: a registered
name or an import reference, as in :mod:`components.learner`).

Every component runs in the project's image (``base_image``), installs nothing at run time and
imports what it needs inside its body (Kubeflow ships only the function's source); the body is one
call into :mod:`components.runtime`, which calls one ``metaopt_core`` function.

(No ``from __future__ import annotations`` in the component modules: KFP reads the parameter
annotations as types when the decorator runs.)
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(
    learner: str,
    config: dict,
    data: Output[Dataset],
    config_uri: str = "",
) -> NamedTuple("PreparedOutputs", [("fingerprint", str), ("config", str), ("summary", str)]):
    """Resolve the run configuration (``config_uri`` if set, else ``config``) and prepare the data
    meta-training reads; the Dataset artifact carries the content fingerprint in its metadata.
    The resolved configuration goes on as JSON text (a KFP dict parameter cannot hold null)."""
    from collections import namedtuple

    from components import runtime

    fingerprint, resolved, summary = runtime.prepare_data(learner, config, config_uri, data)
    return namedtuple("PreparedOutputs", ["fingerprint", "config", "summary"])(fingerprint, resolved, summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_new_data(
    fingerprint: str,
    model_name: str,
    force: bool = False,
) -> NamedTuple("CheckOutputs", [("should_train", bool), ("production_version", str), ("production_fingerprint", str), ("reason", str)]):
    """Meta-train only if forced, if there is no production model yet, or if the data fingerprint
    differs from the one recorded on the production version in the MLflow registry."""
    from collections import namedtuple

    from components import runtime

    should, version, recorded, reason = runtime.check_new_data(fingerprint, model_name, force)
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
) -> NamedTuple("TrackingOutputs", [("run_id", str), ("experiment_id", str), ("tracking_uri", str)]):
    """One MLflow run per pipeline run (or the one MLFLOW_RUN_ID names): config params, the data
    fingerprint tag, the inputs manifest. Later steps log into it by run id."""
    from collections import namedtuple

    from components import runtime

    run_id, experiment_id, uri = runtime.start_tracking(learner, config, data, fingerprint, experiment, model_name, pipeline_run)
    return namedtuple("TrackingOutputs", ["run_id", "experiment_id", "tracking_uri"])(run_id, experiment_id, uri)


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
    settings: dict = {},
    device: str = "",
) -> NamedTuple("MetaTestOutputs", [("scores", dict), ("metric", str), ("greater_is_better", bool)]):
    """Meta-test the learned loss/optimiser against baselines on held-out data: a Markdown table,
    plots (HTML), the scores (as Metrics and as a dict for registration) and the promotion metric."""
    from collections import namedtuple

    from components import runtime

    values, metric, greater = runtime.meta_test(learner, config, data.path, learned.path, run_id, settings, device, report, plots, metrics)
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
    report: Output[Markdown],
    margin: float = 0.0,
) -> NamedTuple("RegistrationOutputs", [("version", str), ("decision", str), ("promoted", bool), ("production_version", str), ("summary", str)]):
    """Register a new version (white-box artifact, provenance, scores) and promote it to production
    if it beats the current production version's metric by more than ``margin``."""
    from collections import namedtuple

    from components import runtime

    outcome = runtime.register_and_promote(learner, config, learned.path, fingerprint, run_id, model_name, scores, metric,
                                           greater_is_better, margin, report)  # fmt: skip
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


__all__ = ["check_new_data", "meta_test", "prepare_data", "register_and_promote", "report_skipped", "start_tracking"]
