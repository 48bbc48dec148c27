"""Warm-up of every format listed in POE_COMPOSER_WARM_FORMATS, in the README's order (`poe up`,
then `poe registry import`, then compose): no request waits for an export, which
poe_compose_template_misses_total counts (and does count, for a layout warm-up never makes).

The pool holds one expert (tops: 2 classes), so that warm-up makes 2 tensor layouts per format, and
the formats are TorchScript and pt2: the first export of a process takes about 5 s (pt2 and ONNX
alike), an ONNX export 3 s more; the pass that makes them does not depend on the format."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from testenv import auth_env, eventually

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.pool import save as save_pool
from poe_services.host import create_server

FORMATS = ("torchscript", "pt2")
# Every fused layout of the pool: its expert keeping 2 classes or 1.
CLASS_SETS = (["T-shirt/top", "Shirt"], ["Shirt"], ["T-shirt/top"])


def misses() -> dict[str, float]:
    return {f: REGISTRY.get_sample_value("poe_compose_template_misses_total", {"format": f}) or 0.0
            for f in ("torchscript", "pt2", "onnx")}


@pytest.fixture(scope="module")
def small_pool_dir(random_pool, tmp_path_factory):
    experts = {t: e for t, e in random_pool.experts.items() if t == "tops"}
    pool = dataclasses.replace(random_pool, name="small-pool", experts=experts)
    return save_pool(pool, tmp_path_factory.mktemp("pool") / "small-pool")


def test_no_request_waits_for_an_export_in_the_readme_order(tmp_path, small_pool_dir):
    settings = dataclasses.replace(Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path / "home")}),
                                   default_pool="small-pool", composer_pool_poll=0.2, composer_warm_formats=FORMATS)
    host = create_server("127.0.0.1:0", settings, ("registry", "composer"), migrate=True)  # warm-up on
    host.start()
    target = f"127.0.0.1:{host.port}"
    runtime = host.runtimes["composer"]
    try:
        with RegistryClient(target) as registry, Composer(target, retries=0) as composer:
            registry.import_pool(small_pool_dir)
            # Ready as soon as the first format is warm; the others follow without a request.
            assert eventually(lambda: runtime.warm_formats("small-pool@1")[:1] == ("torchscript",), 60)
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="poe.v1.Composer"), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert eventually(lambda: runtime.warm_formats("small-pool@1") == FORMATS, 60)
            before, templated = misses(), runtime.engine.scripts.templated
            for fmt in FORMATS:
                for classes in CLASS_SETS:
                    result = composer.compose(classes, format=fmt)
                    assert result.header.format == fmt and not result.header.cache_hit
            assert misses() == before
            assert runtime.engine.scripts.templated == templated

            # The reference execution has templates of its own, which warm-up does not make: the
            # request waits for the export, and the counter says so.
            composer.compose(["Shirt"], execution="reference")
            assert misses() == {**before, "torchscript": before["torchscript"] + 1}
    finally:
        host.stop(None).wait(30)
