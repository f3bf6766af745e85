"""Where a run's rollouts are sampled: inline between optimizer steps, or by a generation
worker process overlapped with training (max_staleness; see docs/async.md)."""

from grpokit.pipeline.pipeline import AsyncPipeline, InlinePipeline, Pipeline, PipelineError, make_pipeline
from grpokit.pipeline.schedule import Limits, Request, needed_version
from grpokit.pipeline.weights import ProbeReport, WeightChannel, compare, probe_logps

__all__ = ["AsyncPipeline", "InlinePipeline", "Limits", "Pipeline", "PipelineError", "ProbeReport", "Request",
           "WeightChannel", "compare", "make_pipeline", "needed_version", "probe_logps"]
