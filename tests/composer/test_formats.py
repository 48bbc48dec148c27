"""ComposeModel in the pt2 and ONNX formats: a real registry + composer (port 0), no warm-up, so the
first request of a layout makes its template and later ones of that layout reuse it."""

import dataclasses

import pytest
import torch
from testenv import auth_env

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.contract import FORMATS, ComposeHeader, format_name
from poe.engine.compose import compose
from poe.engine.config import Settings
from poe.engine.errors import InvalidArgument
from poe.engine.export import model_format
from poe.v1 import composer_pb2 as pb


@pytest.fixture(scope="module")
def cold_stack(tmp_path_factory, pool_dir):
    """(engine, target): registry + composer serving the test pool, templates made on demand."""
    from poe_services.host import create_server

    home = tmp_path_factory.mktemp("formats") / "home"
    settings = dataclasses.replace(Settings.from_env({**auth_env(), "POE_HOME": str(home)}), default_pool="test-pool",
                                   record_compositions=False)
    host = create_server("127.0.0.1:0", settings, ("registry", "composer"), migrate=True, warm=False)
    host.start()
    target = f"127.0.0.1:{host.port}"
    with RegistryClient(target) as reg:
        reg.import_pool(pool_dir)
    yield host.runtimes["composer"].engine, target
    host.stop(1).wait()


@pytest.mark.parametrize("fmt, execution", [("pt2", "fused"), ("onnx", "reference")])
def test_compose_model_streams_a_file_of_the_format_equal_to_the_local_model(cold_stack, random_pool, fmt,
                                                                             execution):
    engine, target = cold_stack
    x = torch.rand(4, 1, 28, 28)
    made = engine.scripts.templated
    with Composer(target) as c:
        first = c.compose(["Sandal", "Bag"], format=fmt, execution=execution)
        second = c.compose(["Shirt", "Coat"], format=fmt, execution=execution)  # same layout, other classes
    assert engine.scripts.templated == made + 1  # the second request was written into the first's template
    for result, classes in ((first, ["Sandal", "Bag"]), (second, ["Shirt", "Coat"])):
        h = result.header
        assert h.format == fmt and h.execution == execution and model_format(result.data) == fmt
        model, meta = result.load()
        assert meta == h.metadata and meta["execution"] == execution and meta["classes"] == list(h.classes)
        local = compose(random_pool, classes, fused=execution == "fused")[1]
        assert torch.allclose(model(x), local(x), atol=1e-5)


def test_formats_have_their_own_model_ids_and_headers(cold_stack):
    _, target = cold_stack
    with Composer(target) as c:
        headers = {fmt: c.describe(["Trouser"], format=fmt) for fmt in FORMATS}
    assert len({h.model_id for h in headers.values()}) == len(FORMATS) == 4
    for fmt, h in headers.items():
        assert h.format == fmt
        assert ComposeHeader.from_message(h.to_message()) == h
        assert format_name(h.to_message().format) == fmt
    assert format_name(pb.MODEL_FORMAT_PT2) == "pt2" and format_name(pb.MODEL_FORMAT_ONNX) == "onnx"
    assert dataclasses.replace(headers["onnx"], format="pt2").format == "pt2"
    with pytest.raises(InvalidArgument, match="format"):
        format_name(99)
    with Composer(target) as c, pytest.raises(InvalidArgument, match="format"):
        c.compose(["Trouser"], format="tflite")
