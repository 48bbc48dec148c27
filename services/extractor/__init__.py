"""The extractor service (`poe.v1.Extractor`): extraction jobs, oracle -> library + experts -> pool.

- `plan`: StartExtraction's checks; a request becomes the job spec recorded in the registry.
- `spec.JobSpec`: the job spec (stored as the job's params_json, handed to the tasks).
- `oracles`: TorchScript and safetensors oracles, and whether they fit a data set.
- `jobs`: the jobs in memory, the queue, cancel, what Get/Watch/List read.
- `driver`: one job from its inputs to the published pool (lock, inputs, stages, publish).
- `stages`: the stages as plain functions; `ray_executor` runs them as Ray tasks.
- `recording`: everything written to the registry (job records, library, experts, publish).
- `runtime.ExtractorRuntime`: wires the parts together, resumes unfinished jobs, health.
- `servicer`: the gRPC layer; `poe_services.host` hosts the runtime.

See docs/EXTRACTOR.md.
"""
