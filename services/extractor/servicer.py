"""The gRPC surface of `poe.v1.Extractor`: convert messages, call the runtime, convert back.

No status codes here: domain errors propagate to `poe_services.errors.ErrorInterceptor`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from poe.engine.errors import field_error
from poe.v1 import extractor_pb2 as pb
from poe.v1 import extractor_pb2_grpc
from poe_services import auth

if TYPE_CHECKING:
    from poe_services.extractor.runtime import ExtractorRuntime


def _job_id(request) -> str:
    if not request.job_id:
        raise field_error("job_id", "required")
    return request.job_id


def job_owner(params_json: str) -> str:
    """Who started a job ("" for jobs from before owners were recorded: only an admin may cancel those)."""
    try:
        owner = json.loads(params_json or "{}").get(auth.OWNER_KEY)
    except (ValueError, AttributeError):
        return ""
    return owner if isinstance(owner, str) else ""


class ExtractorServicer(extractor_pb2_grpc.ExtractorServicer):
    def __init__(self, runtime: ExtractorRuntime):
        self.runtime = runtime

    def StartExtraction(self, request, context) -> pb.StartExtractionResponse:
        if not request.HasField("params"):
            raise field_error("params", "required")
        owner = auth.owner_id(auth.current_principal())
        return pb.StartExtractionResponse(job=self.runtime.start_job(request.params, request.job_id, owner))

    def WatchExtraction(self, request, context) -> Iterator[pb.WatchExtractionResponse]:
        job_id = _job_id(request)
        context.add_callback(self.runtime.poke)  # a client that leaves ends its stream at once
        for job, progress in self.runtime.watch(job_id, context.is_active):
            yield pb.WatchExtractionResponse(job=job, progress=progress)

    def GetExtraction(self, request, context) -> pb.GetExtractionResponse:
        job, progress = self.runtime.snapshot(_job_id(request))
        return pb.GetExtractionResponse(job=job, progress=progress)

    def ListExtractions(self, request, context) -> pb.ListExtractionsResponse:
        jobs, token = self.runtime.list_jobs(request.state, request.page_size, request.page_token)
        return pb.ListExtractionsResponse(jobs=jobs, next_page_token=token)

    def CancelExtraction(self, request, context) -> pb.CancelExtractionResponse:
        job_id = _job_id(request)
        job, _ = self.runtime.snapshot(job_id)
        auth.require_owner(job_owner(job.params_json))
        return pb.CancelExtractionResponse(job=self.runtime.cancel(job_id))


def add_to_server(runtime: ExtractorRuntime, server: grpc.Server) -> None:
    extractor_pb2_grpc.add_ExtractorServicer_to_server(ExtractorServicer(runtime), server)
