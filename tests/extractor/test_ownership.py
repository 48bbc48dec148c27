"""Who may stop an extraction: the publisher that started it, or an admin; never another publisher
(a publisher once cancelled another team's job), nor a reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from poe.client.extractor import ExtractorClient
from poe.engine.errors import PermissionDenied
from poe_services import tokens

PENDING, CANCELLED = 1, 5


def test_only_the_owner_or_an_admin_cancels_a_job(extractors, params):
    host, admin, _runtime = extractors.start()
    path = Path(os.environ["POE_TOKENS_FILE"])  # the run's token file, which the test servers read
    team_a = tokens.create(path, "publisher", "team a")
    team_b = tokens.create(path, "publisher", "team b")
    reader = tokens.create(path, "reader", "dashboard")
    target = f"127.0.0.1:{host.port}"
    a, b, r = (ExtractorClient(target, token=t, timeout=60) for _, t in (team_a, team_b, reader))
    try:
        # A long job first, so that the jobs under test stay queued (one job at a time).
        busy = admin.start(params(expert_epochs=40))
        first = a.start(params(), job_id="team-a-1")
        assert json.loads(first.params_json)["owner"] == team_a[0].id
        with pytest.raises(PermissionDenied, match="owner"):
            b.cancel("team-a-1")
        with pytest.raises(PermissionDenied):
            r.cancel("team-a-1")
        with pytest.raises(PermissionDenied):
            r.start(params(), job_id="reader-1")
        assert b.get("team-a-1").job.state == PENDING  # readers and other publishers may look
        assert a.cancel("team-a-1").state == CANCELLED

        second = a.start(params(), job_id="team-a-2")
        assert admin.cancel(second.id).state == CANCELLED  # an admin may stop anyone's job
        assert admin.cancel(busy.id).state == CANCELLED
    finally:
        for client in (a, b, r):
            client.close()
