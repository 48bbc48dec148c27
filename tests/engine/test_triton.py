"""Triton model-repository entries: config.pbtxt parsed with Triton's schema (the subset vendored
in tests/engine/triton/model_config.proto), and the model file run as Triton would feed it."""

import importlib.util
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from poe.engine.compose import composed_state, plan
from poe.engine.errors import InvalidArgument
from poe.engine.export import ScriptCache, serialize
from poe.engine.triton import write_entry

PROTO_DIR = Path(__file__).resolve().parent / "triton"


@pytest.fixture(scope="module")
def model_config_pb2(tmp_path_factory):
    """Triton's ModelConfig messages, compiled from the vendored proto at test time."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("triton_pb2")
    well_known = resources.files("grpc_tools") / "_proto"
    assert protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}",
                        "model_config.proto"]) == 0
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", out / "model_config_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def composed(random_pool):
    """(plan, {format: (bytes, poe.json)}) for Sandal + Sneaker + Bag, fused."""
    cache = ScriptCache(copies=1)
    p = plan(random_pool, ["Sandal", "Sneaker", "Bag"])
    state = composed_state(random_pool, p, True)
    return p, {fmt: serialize(random_pool, p, state, "fused", fmt, cache) for fmt in ("onnx", "torchscript")}


def parse(model_config_pb2, entry: Path):
    return text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_onnx_entry_is_a_valid_config_for_its_model(model_config_pb2, composed, tmp_path):
    import onnxruntime

    p, files = composed
    data, meta = files["onnx"]
    entry = write_entry(tmp_path / "repo", "shoes-and-bags", data, "onnx", meta, max_batch_size=64)
    assert entry == tmp_path / "repo" / "shoes-and-bags"
    config = parse(model_config_pb2, entry)
    assert config.name == "shoes-and-bags" and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert config.HasField("dynamic_batching")
    (inp,), (out,) = config.input, config.output
    assert inp.data_type == out.data_type == model_config_pb2.TYPE_FP32
    assert list(inp.dims) == [1, 28, 28] and list(out.dims) == [3]
    assert (entry / out.label_filename).read_text().splitlines() == list(p.class_names)
    # What Triton does with it: the version folder's model.onnx, fed [N, *dims] by the config's names.
    session = onnxruntime.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [inp.name]
    assert [o.name for o in session.get_outputs()] == [out.name]
    for n in (1, config.max_batch_size):
        (logits,) = session.run([out.name], {inp.name: np.random.rand(n, *inp.dims).astype(np.float32)})
        assert logits.shape == (n, *out.dims)


def test_torchscript_entry_follows_the_pytorch_backend_naming(model_config_pb2, composed, tmp_path):
    p, files = composed
    data, meta = files["torchscript"]
    entry = write_entry(tmp_path / "repo", "shoes", data, "torchscript", meta)
    config = parse(model_config_pb2, entry)
    assert config.backend == "pytorch" and config.max_batch_size > 0 and config.HasField("dynamic_batching")
    (inp,), (out,) = config.input, config.output
    assert inp.name.endswith("__0") and out.name.endswith("__0")  # <name>__<index>: how the backend binds them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(entry / "1" / "model.pt"))
    assert model(torch.rand(5, *inp.dims)).shape == (5, *out.dims)
    assert (entry / out.label_filename).read_text().splitlines() == list(p.class_names)


@pytest.mark.parametrize("fmt, name, batch, message", [
    ("pt2", "m", 8, "needs format onnx or torchscript"),
    ("safetensors", "m", 8, "needs format onnx or torchscript"),
    ("onnx", "../escape", 8, "triton model name"),
    ("onnx", "", 8, "triton model name"),
    ("onnx", "m", 0, "max batch size"),
])
def test_bad_entries_are_refused_before_writing(composed, tmp_path, fmt, name, batch, message):
    data, meta = composed[1]["onnx"]
    with pytest.raises(InvalidArgument, match=message):
        write_entry(tmp_path / "repo", name, data, fmt, meta, max_batch_size=batch)
    assert not (tmp_path / "repo").exists()
