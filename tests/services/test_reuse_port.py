"""A port in use is refused unless every server on it shares it on purpose (`reuse_port`)."""

import pytest
from testenv import auth_env

from poe.engine.config import Settings
from poe.engine.errors import Unavailable
from poe_services.host import create_server


def _server(tmp_path, port: int, reuse_port: bool):
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path)})
    return create_server(f"127.0.0.1:{port}", settings, ("composer",), registry_target="127.0.0.1:1", warm=False,
                         reuse_port=reuse_port)


def test_a_second_server_on_a_port_in_use_fails_unless_both_share_it(tmp_path):
    first = _server(tmp_path, 0, reuse_port=False)
    try:
        with pytest.raises(Unavailable, match="cannot listen"):
            _server(tmp_path, first.port, reuse_port=True)
    finally:
        first.stop(None).wait()
    shared = _server(tmp_path, 0, reuse_port=True)
    try:
        second = _server(tmp_path, shared.port, reuse_port=True)
        second.stop(None).wait()
        with pytest.raises(Unavailable, match="cannot listen"):
            _server(tmp_path, shared.port, reuse_port=False)
    finally:
        shared.stop(None).wait()
