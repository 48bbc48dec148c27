"""The chart's README.md: its values table is generated from the comments of values.yaml by
deploy/helm/poe/ci/gen_readme.py and must be current."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import yaml
from deploy_paths import CHART

SCRIPT = CHART / "ci" / "gen_readme.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_values_table_is_current():
    gen = _generator()
    readme = (CHART / "README.md").read_text()
    wanted = gen.updated_readme(readme, gen.render_table((CHART / "values.yaml").read_text()))
    assert readme == wanted, "README.md is out of date: run python deploy/helm/poe/ci/gen_readme.py"


def test_every_top_level_value_and_the_security_keys_have_a_row():
    gen = _generator()
    rows = {".".join(path): text for path, text in gen.documented_keys((CHART / "values.yaml").read_text())}
    assert set(yaml.safe_load((CHART / "values.yaml").read_text())) <= set(rows)
    for key in ("auth.anonymousRole", "auth.existingSecret", "tls.enabled", "tls.clientAuth",
                "tls.certManager.issuerRef", "global.imageRegistry", "composer.env", "registry.sidecars",
                "extractor.extraVolumes", "composer.extraVolumeMounts"):
        assert rows.get(key), key
    # A section's introduction stays out of the row of the key under it: only the `# --` text.
    assert rows["auth.existingSecret"].startswith("Secret with the keys tokens.json")


def test_the_check_fails_on_a_stale_table_and_the_script_fixes_it(tmp_path):
    chart = tmp_path / "poe"
    chart.mkdir()
    for name in ("values.yaml", "README.md"):
        shutil.copy(CHART / name, chart / name)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# -- Serve TLS", "# -- Serve TLS, documented anew:", 1))

    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), "--chart", str(chart), *args],
                              capture_output=True, text=True, timeout=60)

    stale = run("--check")
    assert stale.returncode == 1 and "out of date" in stale.stderr
    assert run().returncode == 0
    assert "Serve TLS, documented anew:" in (chart / "README.md").read_text()
    assert run("--check").returncode == 0
    (chart / "README.md").write_text("no markers\n")
    broken = run("--check")
    assert broken.returncode == 1 and "markers" in broken.stderr
