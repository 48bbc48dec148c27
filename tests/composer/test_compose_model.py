import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testenv import auth_env

from poe.client.composer import Composer
from poe.engine.compose import compose
from poe.engine.errors import InvalidArgument, NotFound, PoeError, Unavailable
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc
from poe_services.metrics import serve_metrics


def test_compose_returns_a_verified_model_equal_to_local_composition(stack, random_pool):
    _, target = stack
    with Composer(target) as c:
        result = c.compose(["Sandal", "sneaker", "8"])
    h = result.header
    assert h.pool == "test-pool@1" and h.classes == ("Sandal", "Sneaker", "Bag") and h.class_ids == (5, 7, 8)
    assert h.tasks == ("footwear", "bags") and len(h.expert_ids) == 2 and h.format == "torchscript"
    assert h.input_shape == (1, 28, 28) and h.size == len(result.data) and h.flops > 0
    assert 0 < h.expected_accuracy <= 1 and h.execution == "fused" and not h.cache_hit
    model, meta = result.load()
    assert meta["classes"] == list(h.classes) and meta["pool"] == "test-pool@1" and h.metadata == meta
    _, local = compose(random_pool, ["Sandal", "Sneaker", "Bag"])
    assert meta["params"] == h.params == sum(p.numel() for p in compose(random_pool, ["Sandal", "Sneaker", "Bag"],
                                                                           fused=False)[1].parameters())
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(model(x), local(x), atol=1e-5)


def test_client_in_another_process_loads_with_plain_torch(stack, tmp_path, random_pool):
    _, target = stack
    out = subprocess.run([sys.executable, "-m", "poe.cli.main", "compose", "--target", target, "--classes",
                          "Coat,Trouser", "-o", str(tmp_path / "m.pt"), "--json"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["classes"] == ["Trouser", "Coat"]
    x = torch.rand(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch
        m = torch.jit.load(sys.argv[1] + "/m.pt")
        y = m(torch.load(sys.argv[1] + "/x.pt", weights_only=True))
        print(",".join(f"{v:.6f}" for v in y.flatten().tolist()))
    """)
    res = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = torch.tensor([float(v) for v in res.stdout.strip().split(",")]).view(3, 2)
    assert torch.allclose(got, compose(random_pool, ["Coat", "Trouser"])[1](x), atol=1e-5)


def test_repeated_request_is_a_cache_hit_with_the_same_bytes(stack):
    _, target = stack
    with Composer(target) as c:
        first = c.compose(tasks=["warm-layers"], pool="test-pool@stable")
        second = c.compose(tasks=["warm-layers"], pool="test-pool@1")
    assert not first.header.cache_hit and second.header.cache_hit
    assert first.data == second.data and second.header == dataclasses.replace(first.header, cache_hit=True)


def test_concurrent_identical_requests_build_once(stack):
    host, target = stack
    engine = host.runtimes["composer"].engine
    builds = []
    original = engine._build

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    engine._build = counting
    try:
        barrier = threading.Barrier(8)

        def one(_):
            with Composer(target) as c:
                barrier.wait()
                return c.compose(["Shirt", "Dress", "Ankle boot"])

        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(one, range(8)))
    finally:
        engine._build = original
    assert len(builds) == 1
    assert len({r.header.sha256 for r in results}) == 1


def test_reference_execution_and_safetensors_format(stack, random_pool):
    from safetensors import safe_open

    _, target = stack
    with Composer(target) as c:
        ref = c.compose(["Pullover", "Bag"], execution="reference")
        st = c.compose(["Pullover", "Bag"], format="safetensors")
    assert ref.header.execution == "reference" and ref.header.params == st.header.params
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(ref.load()[0](x), compose(random_pool, ["Pullover", "Bag"])[1](x), atol=1e-5)
    from safetensors.torch import load as st_load

    tensors = st_load(st.data)
    # Fused: the linear layer's rows are already the classes in order (no `order` buffer).
    assert tensors["experts.fc.weight"].shape[0] == 2 and "order" not in tensors
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(st.data)
        f.flush()
        with safe_open(f.name, "pt") as sf:
            meta = sf.metadata()
    assert json.loads(meta["poe.json"])["classes"] == ["Pullover", "Bag"] and json.loads(meta["spec"])["experts"]


def test_describe_matches_compose_without_building(stack):
    _, target = stack
    with Composer(target) as c:
        d = c.describe(["T-shirt/top", "Sandal"])
        assert d.size == 0 and d.sha256 == "" and not d.cache_hit and d.metadata == {}
        r = c.compose(["T-shirt/top", "Sandal"])
        d2 = c.describe(["T-shirt/top", "Sandal"])
    assert d == dataclasses.replace(r.header, size=0, sha256="", metadata={})  # all but the file's own fields
    assert d2 == dataclasses.replace(r.header, cache_hit=True)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"classes": ["Sandal", "Boots", "Hats"]}, InvalidArgument, "'Boots', 'Hats'"),
    ({"classes": []}, InvalidArgument, "empty request"),
    ({"tasks": ["hats"]}, InvalidArgument, "unknown primitive tasks"),
    ({"classes": ["Bag"], "pool": "no-such-pool"}, NotFound, "no-such-pool"),
    ({"classes": ["Bag"], "pool": "test-pool@9"}, NotFound, "test-pool"),
])
def test_errors_have_the_right_status(stack, kwargs, error, message):
    _, target = stack
    with Composer(target, retries=0) as c, pytest.raises(error, match=message):
        c.compose(**kwargs)


@pytest.mark.parametrize("classes, tasks, pool", [
    ([], [], "test-pool"),
    ([" "], [""], "no-such-pool"),  # the empty request is noticed before the pool look-up
    (["Sandal", "Boots", "Hats"], [], "test-pool"),
    (["Bag"], ["hats"], "test-pool@stable"),
    (["Bag"], [], "no-such-pool"),
    (["Bag"], [], "no-bags"),
])
def test_resolve_classes_fails_exactly_as_compose_model(stack, classes, tasks, pool):
    """One resolution (poe.engine.compose.plan) behind both RPCs: same status, message and field."""
    from poe.client.registry import RegistryClient

    _, target = stack
    with RegistryClient(target) as reg, Composer(target, retries=0) as c:
        pv = reg.get_pool("test-pool")
        reg.publish_pool("no-bags", "1", pv.library.id, [x.id for x in pv.experts if x.task != "bags"],
                         info=json.loads(pv.info_json))
        with pytest.raises(PoeError) as composed:
            c.compose(classes, tasks=tasks, pool=pool)
        with pytest.raises(PoeError) as resolved:
            reg.resolve_classes(pool, classes, tasks)
    assert type(composed.value) is type(resolved.value) and str(composed.value) == str(resolved.value)
    assert getattr(composed.value, "field", None) == getattr(resolved.value, "field", None)


def test_resolve_classes_answers_as_compose_model_composes(stack):
    from poe.client.registry import RegistryClient

    _, target = stack
    with RegistryClient(target) as reg, Composer(target) as c:
        header = c.describe(["bag", "5"], tasks=["warm-layers"])
        res = reg.resolve_classes("test-pool", ["bag", "5"], ["warm-layers"])
    assert res.pool == header.pool and tuple(res.class_ids) == header.class_ids
    assert tuple(res.class_names) == header.classes and tuple(x.task for x in res.experts) == header.tasks
    assert tuple(x.id for x in res.experts) == header.expert_ids


def test_raw_status_codes(stack):
    _, target = stack
    with grpc.insecure_channel(target) as ch:
        stub = composer_pb2_grpc.ComposerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ComposeModel(pb.ComposeModelRequest(classes=["Boots"])))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Boots" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ComposeModel(pb.ComposeModelRequest(pool="nope", classes=["Bag"])))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ComposeModel(pb.ComposeModelRequest(classes=["Bag", "Coat", "Shirt"]), timeout=0.0005))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_registry_down_is_unavailable(tmp_path):
    import socket

    from poe.engine.config import Settings
    from poe_services.host import create_server

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path)})
    host = create_server("127.0.0.1:0", settings, ("composer",), registry_target=f"127.0.0.1:{dead}", warm=False)
    host.runtimes["composer"].registry.timeout = 2.0
    host.start()
    try:
        with Composer(f"127.0.0.1:{host.port}", retries=0) as c, pytest.raises(Unavailable):
            c.compose(["Bag"], pool="fashion-mnist")
        with grpc.insecure_channel(f"127.0.0.1:{host.port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="poe.v1.Composer"))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # ...but alive: Kubernetes' liveness probe asks for "liveness" and must not restart it.
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="liveness"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        host.stop(0).wait()


def test_health_and_reflection(stack):
    _, target = stack
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("poe.v1.Composer", "poe.v1.Registry"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_metrics_are_exported(stack):
    _, target = stack
    port = serve_metrics(0, "127.0.0.1")

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    before = scrape()
    with Composer(target, retries=0) as c:
        r = c.compose(["Coat", "Sneaker", "Dress"])
        c.compose(["Coat", "Sneaker", "Dress"])
        with pytest.raises(InvalidArgument):
            c.compose(["Unicorn"])
    after = scrape()
    miss = 'poe_compose_duration_seconds_count{cache="miss",format="torchscript",grpc_code="OK"}'
    hit = 'poe_compose_duration_seconds_count{cache="hit",format="torchscript",grpc_code="OK"}'
    assert value(after, miss) - value(before, miss) == 1
    assert value(after, hit) - value(before, hit) == 1
    bad = 'poe_compose_requests_total{grpc_code="INVALID_ARGUMENT"}'
    assert value(after, bad) - value(before, bad) == 1
    streamed = "poe_compose_streamed_bytes_total"
    assert value(after, streamed) - value(before, streamed) == 2 * r.header.size
    for stage in ("resolve", "fetch", "consolidate", "serialize", "stream"):
        assert f'poe_compose_stage_duration_seconds_count{{stage="{stage}"}}' in after
    assert value(after, "poe_compose_in_flight_requests") == 0
    rpc = ('grpc_server_handled_total{grpc_code="OK",grpc_method="ComposeModel",grpc_service="poe.v1.Composer",'
           'grpc_type="server_stream"}')
    assert value(after, rpc) - value(before, rpc) == 2


def test_compositions_are_recorded_in_the_registry(stack):
    import time

    from poe.client.registry import RegistryClient

    _, target = stack
    with Composer(target) as c:
        r = c.compose(["Trouser", "Sneaker"])
    with RegistryClient(target) as reg:
        deadline = time.monotonic() + 10
        entry = None
        while entry is None and time.monotonic() < deadline:
            entry = reg.get_composed_model("test-pool@1", r.header.class_ids, "torchscript.fused")
            time.sleep(0.05)
        assert entry is not None and entry.blob.sha256 == r.header.sha256
        assert reg.download(entry.blob.sha256) == r.data


def test_bench_compose_quick_runs(pool_dir, tmp_path):
    """The benchmark harness itself (tiny request counts) against a real S3 server (moto)."""
    from poe.bench import compose as bench

    result = bench.run(pool_dir, tmp_path, per_case=2, cold=2, clients=2, throughput_requests=6, s3=True)
    assert result["blob_store"] == "s3 (moto)"
    assert set(result["cases"]) == {"warm_1", "warm_2", "warm_3", "warm_4", "warm_5", "cold"}
    for case in result["cases"].values():
        assert 0 < case["p50_ms"] <= case["p99_ms"]
    assert result["cases"]["warm_3"]["jit_save_floor_ms"] > 0
    assert result["throughput"]["compositions_per_s"] > 0 and result["throughput"]["n"] == 6


def test_served_pool_accuracy_equals_local_evaluation(stack, random_pool, fmnist_test):
    """`poe bench pool --target`: models through ComposeModel score exactly what local builds score."""
    from poe.bench.pool import evaluate_served_pool
    from poe.engine.data import Dataset
    from poe.engine.evaluate import evaluate_pool

    _, target = stack
    test = Dataset("fashion-mnist", fmnist_test.images[:1000], fmnist_test.labels[:1000], fmnist_test.classes)
    served = evaluate_served_pool(target, "test-pool", random_pool.oracle(), test, max_tasks=1)
    local = evaluate_pool(random_pool, test, max_tasks=1)
    assert [r["tasks"] for r in served] == [r["tasks"] for r in local] and len(served) == 5
    for s, lo in zip(served, local, strict=True):
        assert s["accuracy"] == lo["accuracy"] and s["oracle_accuracy"] == lo["oracle_accuracy"], s["tasks"]
        assert s["params"] == lo["params"] and s["pool"] == "test-pool@1"
