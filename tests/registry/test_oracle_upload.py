"""RegisterOracle accepts weights only: safetensors whose tensors are exactly those of the
architecture its config names. Programs (TorchScript, torch.export, pickles) and anything else are
INVALID_ARGUMENT naming the field, and nothing is stored (real servers: SQLite + files and
PostgreSQL + S3)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load

from poe.engine import architectures
from poe.engine import hierarchy as hierarchy_mod
from poe.engine.architectures import placeholder_weights
from poe.engine.errors import InvalidArgument, NotFound
from poe.engine.export import quiet_jit
from poe.engine.nets import WideResNet, WRNConfig
from poe.engine.pool import config_to_dict

FM = "fashion-mnist"


def _blob_keys(host) -> list[str]:
    return sorted(host.runtimes["registry"].registry.blobs.list())


def _staging_empty(host) -> bool:
    blobs = host.runtimes["registry"].registry.blobs
    if hasattr(blobs, "root"):
        return not any((blobs.root / "staging").iterdir())
    return not list(blobs.client.list_objects(blobs.bucket, prefix=f"{blobs.prefix}staging/", recursive=True))


def _torchscript() -> bytes:
    buf = io.BytesIO()
    with quiet_jit():
        torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))), buf)
    return buf.getvalue()


def _with(state: dict, **changes) -> bytes:
    """Safetensors bytes of `state` with tensors replaced (a value) or dropped (None)."""
    out = {k: v.numpy() for k, v in state.items()}
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return np_save(out)


def test_weights_of_the_named_architecture_are_registered(registry):
    client, _host, _ = registry
    client.register_hierarchy(hierarchy_mod.builtin(FM))
    state = WideResNet(WRNConfig(depth=10, width=1)).state_dict()  # num_batches_tracked: int64
    o1, created = client.register_oracle("torch's own", FM, {"depth": 10}, _with(state))
    assert created and o1.blob.size > 0
    # As `poe train` writes it (every tensor float32), with the architecture named explicitly.
    as_float = {k: v.float() for k, v in state.items()}
    o2, created = client.register_oracle("float32", FM, {"architecture": "wideresnet", "depth": 10}, _with(as_float))
    assert created and o2.id != o1.id
    data = placeholder_weights({"depth": 16, "width": 2, "in_channels": 3, "num_classes": 7,
                                "mean": [0.5] * 3, "std": [0.25] * 3})
    o3, _ = client.register_oracle("rgb", FM, {"depth": 16, "width": 2, "in_channels": 3, "num_classes": 7,
                                               "mean": [0.5] * 3, "std": [0.25] * 3}, data)
    assert client.download(o3.blob.sha256) == data


def test_programs_pickles_and_mismatching_weights_are_refused_and_nothing_is_stored(registry):
    client, host, _ = registry
    client.register_hierarchy(hierarchy_mod.builtin(FM))
    before = _blob_keys(host)
    model = WideResNet(WRNConfig(depth=10, width=1))
    state = model.state_dict()
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    zipped = io.BytesIO()
    torch.save(state, zipped)
    exported = io.BytesIO()
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.rand(2, 4),)), exported)
    wide = placeholder_weights({"depth": 16, "width": 2})
    cases = [
        # (config, bytes, field, fragment of the message)
        ({"depth": 10}, _torchscript(), "chunk", "a zip archive (TorchScript, torch.export or torch.save)"),
        ({"depth": 10}, exported.getvalue(), "chunk", "a zip archive"),
        ({"depth": 10}, zipped.getvalue(), "chunk", "a zip archive"),
        ({"depth": 10}, legacy.getvalue(), "chunk", "a pickle (torch.save)"),
        ({"depth": 10}, pickle.dumps({"weights": [1, 2, 3]}), "chunk", "a pickle"),
        ({"depth": 10}, np.random.default_rng(0).bytes(5000), "chunk", "not a safetensors file"),
        ({"depth": 10}, b"", "chunk", "empty upload"),
        ({"depth": 10}, wide, "chunk", "more than"),  # larger than WRN-10-1 weights can be: refused as it arrives
        ({"depth": 10}, _with(state, **{"head.fc.bias": None}), "chunk", "missing head.fc.bias"),
        ({"depth": 10}, _with(state, extra=np.zeros(3, np.float32)), "chunk", "unexpected extra"),
        ({"depth": 10}, _with(state, **{"head.fc.weight": np.zeros((10, 64), np.float16)}), "chunk",
         "head.fc.weight is F16[10, 64], expected F32[10, 64]"),
        ({"depth": 10, "num_classes": 7}, _with(state), "chunk",
         "head.fc.weight is F32[10, 64], expected F32[7, 64]"),
        ({"architecture": "resnet50"}, _with(state), "config_json", "architecture 'resnet50' is not known"),
        ({"depth": 11}, _with(state), "config_json", "depth must be 6n + 4"),
        ({"depth": 10, "width": 1000}, _with(state), "config_json", "width must be"),
        ({"depth": 10, "code": "import os"}, _with(state), "config_json", "unknown WideResNet setting(s) 'code'"),
    ]
    for config, data, field, fragment in cases:
        with pytest.raises(InvalidArgument) as info:
            client.register_oracle("bad", FM, config, data)
        assert info.value.field == field, (fragment, str(info.value))  # type: ignore[attr-defined]
        assert fragment in str(info.value), (fragment, str(info.value))
    with pytest.raises(NotFound):
        client.get_oracle(1)
    assert _blob_keys(host) == before
    assert _staging_empty(host)


def test_layout_is_computed_without_building_the_network():
    """The expected tensors, computed from the config alone, are exactly the module's state dict."""
    for cfg in (WRNConfig(depth=10, width=1), WRNConfig(depth=16, width=4),
                WRNConfig(depth=22, width=3, in_channels=3, num_classes=7, stem_stride=2, mean=(0.1, 0.2, 0.3),
                          std=(0.5, 0.5, 0.5))):
        with torch.device("meta"):
            state = WideResNet(cfg).state_dict()
        oracle = architectures.parse_oracle_config(config_to_dict(cfg))
        expected = oracle.tensors()
        assert set(expected) == set(state)
        assert all(expected[k].shape == tuple(v.shape) for k, v in state.items())
        assert oracle.to_dict() == config_to_dict(cfg)
    # The parser's defaults are WRNConfig's.
    assert architectures.parse_oracle_config({}).build().cfg == WRNConfig()
    model = architectures.parse_oracle_config({"depth": 10}).build()
    model.load_state_dict(st_load(placeholder_weights({"depth": 10})), strict=True)
