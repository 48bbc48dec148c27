"""The extractor service (`poe.v1.Extractor`): extraction jobs, oracle -> library + experts -> pool.

- `plan`: StartExtraction's checks; a request becomes the job spec recorded in the registry.
- `oracles`: TorchScript and safetensors oracles, and whether they fit a data set.
- `worker`: the training, in a spawned worker process (reports over a pipe, JSON only).
- `runtime.ExtractorRuntime`: queue, supervisors, registry records, resume, health.
- `servicer`, `server` (`create_server`, `serve`), `client.ExtractorClient`.

See docs/EXTRACTOR.md.
"""
