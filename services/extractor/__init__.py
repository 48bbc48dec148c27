"""The extractor service (`poe.v1.Extractor`): extraction jobs, oracle -> library + experts -> pool.

- `plan`: StartExtraction's checks; a request becomes the job spec recorded in the registry.
- `spec.JobSpec`: the job spec (stored as the job's params_json, handed to the worker).
- `oracles`: TorchScript and safetensors oracles, and whether they fit a data set.
- `jobs`: the jobs in memory, the queue, cancel, what Get/Watch/List read.
- `supervision`: one job's worker process (lock, inputs, spawn, messages, restarts, stop).
- `recording`: everything written to the registry (job records, library, experts, publish).
- `worker`: the training, in a spawned worker process (reports over a pipe, JSON only).
- `runtime.ExtractorRuntime`: wires the parts together, resumes unfinished jobs, health.
- `servicer`: the gRPC layer; `poe_services.host` hosts the runtime.

See docs/EXTRACTOR.md.
"""
