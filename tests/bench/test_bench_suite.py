"""`poe bench baselines | cross-expert | inference` in quick mode, so the harnesses cannot rot.

Every part runs once through the real command line (in process) on a small pool with random
weights and real Fashion-MNIST images; the tests check the JSON it writes, the Markdown it puts
between its markers, and that the figures are consistent with each other and with the core.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from poe.bench import baselines, common, cross_expert, inference, report
from poe.cli.main import main
from poe.cli.output import EXIT_INVALID_ARGUMENT, EXIT_NOT_FOUND
from poe.engine.compose import compose
from poe.engine.errors import InvalidArgument
from poe.engine.pool import load as load_pool
from poe.engine.pool import save as save_pool


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared with long training runs: one torch thread for these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool_dir(random_pool, tmp_path_factory) -> Path:
    return save_pool(random_pool, tmp_path_factory.mktemp("bench-pool") / "test-pool")


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs") / "BENCHMARKS.md"


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def run_part(part: str, pool_dir: Path, docs: Path, tmp: Path, *extra: str) -> tuple[dict, str, float]:
    json_out = tmp / f"{part}.json"
    t0 = time.perf_counter()
    rc, out, err = run_cli("bench", part, "--pool", str(pool_dir), "--quick", "--json-out", str(json_out),
                           "--update-docs", "--docs", str(docs), *extra)
    assert rc == 0, err
    result = json.loads(json_out.read_text())
    # The command stated with the figures reproduces the run: every option that was given.
    assert result["command"] == (f"poe bench {part} --pool {pool_dir} --quick --json-out {json_out} --update-docs "
                                 f"--docs {docs}" + "".join(f" {a}" for a in extra))
    return result, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def baselines_run(pool_dir, docs, tmp_path_factory):
    return run_part("baselines", pool_dir, docs, tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def cross_expert_run(pool_dir, docs, tmp_path_factory):
    return run_part("cross-expert", pool_dir, docs, tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def inference_run(pool_dir, docs, tmp_path_factory):
    return run_part("inference", pool_dir, docs, tmp_path_factory.mktemp("out"))


def in_unit(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def check_provenance(result: dict, part: str, pool_dir: Path) -> None:
    assert result["part"] == part and result["quick"] is True and result["pool"] == "test-pool@1"
    hw = result["hardware"]
    assert hw["cpu"] and hw["cores"] >= 1 and hw["torch"] == torch.__version__ and hw["torch_threads"] >= 1


# -- baselines -----------------------------------------------------------------------------------

def test_baselines_rows_are_complete_and_in_range(baselines_run, pool_dir, random_pool):
    result, _, _ = baselines_run
    check_provenance(result, "baselines", pool_dir)
    assert result["queries"] == len(result["rows"]) == 2 and result["possible_queries"] == 31
    assert sorted(r["n"] for r in result["rows"]) == [1, 2]  # the sample is spread over the sizes
    expert_width = next(iter(random_pool.experts.values())).config.width
    assert result["head_width_per_task"] == expert_width
    for r in result["rows"]:
        ids = sorted(c for t in r["tasks"] for c in random_pool.hierarchy.tasks[t])
        assert r["classes"] == [random_pool.hierarchy.classes[c] for c in ids]
        assert r["test_images"] == 20 * len(ids) and 0 < r["monitor_images"] <= r["test_images"]
        assert in_unit(r["oracle"]["accuracy"]) and in_unit(r["poe"]["accuracy"])
        assert in_unit(r["poe"]["monitor_accuracy"])
        assert 0 < r["poe"]["compose_s"] < 5
        assert 0 < r["poe"]["params"] < r["oracle"]["params"] and 0 < r["poe"]["flops"] < r["oracle"]["flops"]
        for m in ("scratch", "transfer", "ckd"):
            b = r[m]
            assert in_unit(b["accuracy"]) and in_unit(b["best_monitor_accuracy"])
            assert b["params"] > 0 and b["flops"] > 0 and b["steps"] >= 1
            # Reached exactly when the best monitor accuracy matched PoE's, and no later than the end.
            assert b["reached"] == (b["best_monitor_accuracy"] >= r["poe"]["monitor_accuracy"])
            assert (b["time_to_target_s"] is not None) == b["reached"]
            if b["reached"]:
                assert 0 <= b["time_to_target_s"] <= b["train_s"]
                assert b["speedup"] == pytest.approx(b["time_to_target_s"] / r["poe"]["compose_s"], abs=0.1)
            times = [c[1] for c in b["curve"]]
            assert times == sorted(times) and b["curve"][0][0] == 0 and b["curve"][-1][0] == b["steps"]
        # One training epoch over the training images each baseline sees (batch 32 in quick mode).
        assert r["scratch"]["steps"] == (40 * len(ids)) // 32
        assert r["ckd"]["steps"] == (40 * 10) // 32  # CKD: the whole training set
        reached = [r[m]["time_to_target_s"] for m in ("scratch", "transfer", "ckd") if r[m]["reached"]]
        assert r["fastest_baseline_s"] == (min(reached) if reached else None)


def test_baseline_heads_are_w_times_n_wide(baselines_run):
    """For one primitive task, Scratch, Transfer and CKD head have exactly PoE's architecture."""
    result, _, _ = baselines_run
    one = next(r for r in result["rows"] if r["n"] == 1)
    assert one["scratch"]["params"] == one["transfer"]["params"] == one["ckd"]["params"] == one["poe"]["params"]
    assert one["scratch"]["flops"] == one["transfer"]["flops"] == one["poe"]["flops"]
    two = next(r for r in result["rows"] if r["n"] == 2)
    assert two["transfer"]["params"] > two["poe"]["params"]  # one 2w-wide head has more weights than two w-wide


def test_baselines_summary_and_docs(baselines_run, docs):
    result, out, _ = baselines_run
    s = result["summary"]
    assert set(s["by_n"]) == {"1", "2"} and s["all"]["queries"] == 2
    means = [r["poe"]["accuracy"] for r in result["rows"]]
    assert s["all"]["poe_accuracy"] == pytest.approx(sum(means) / 2, abs=1e-6)
    assert s["all"]["poe_minus_scratch_pt"]["min"] <= s["all"]["poe_minus_scratch_pt"]["mean"]
    text = docs.read_text()
    start, end = report.markers("baselines")
    section = text[text.index(start):text.index(end)]
    assert result["command"] in section and "Quick mode" in section and "| n | queries | oracle (restricted)" in section
    assert "Time to build" in out and "speed-up" in out


# -- cross-expert --------------------------------------------------------------------------------

def test_cross_expert_shares(cross_expert_run, pool_dir):
    result, _, _ = cross_expert_run
    check_provenance(result, "cross-expert", pool_dir)
    assert result["queries"] == len(result["rows"]) == 10 + 10 + 5 + 1  # every query of 2..5 of 5 tasks
    assert set(result["summary"]["by_n"]) == {"2", "3", "4", "5"}
    sets = result["expert_sets"]
    assert sets["soft"]["source"] == sets["scale"]["source"] == "trained" and sets["both"]["source"] == "pool"
    assert sets["soft"]["loss"]["scale_weight"] == 0 and sets["scale"]["loss"]["soft_weight"] == 0
    for r in result["rows"]:
        for name in ("soft", "scale", "both"):
            c = r[name]
            assert 0 <= c["cross_expert_errors"] <= c["errors"] <= r["test_images"]
            assert c["accuracy"] == pytest.approx(1 - c["errors"] / r["test_images"], abs=1e-6)
            assert (c["cross_expert_share"] is None) == (c["errors"] == 0)
            assert c["cross_expert_share"] is None or in_unit(c["cross_expert_share"])
    for b in result["summary"]["by_n"].values():
        for name in ("soft", "scale", "both"):
            assert b[name]["share"] is None or in_unit(b[name]["share"])


def test_cross_expert_errors_match_the_composed_model(cross_expert_run, pool_dir, fmnist_test):
    """The harness derives each query's prediction from per-expert logits; compose must agree."""
    result, _, _ = cross_expert_run
    pool = load_pool(pool_dir)
    test = fmnist_test.stratified(common.QUICK_DATA.test_per_class, 0)
    task_of = torch.empty(10, dtype=torch.long)
    for i, ids in enumerate(pool.hierarchy.tasks.values()):
        task_of[list(ids)] = i
    for row in (result["rows"][0], result["rows"][-1]):
        p, model = compose(pool, tasks=row["tasks"])
        ids = torch.tensor(p.class_ids)
        mask = torch.isin(test.labels, ids)
        with torch.no_grad():
            pred = ids[model(test.images[mask].float() / 255).argmax(1)]
        errors, cross = cross_expert.cross_expert_counts(pred, test.labels[mask], task_of)
        assert (errors, cross) == (row["both"]["errors"], row["both"]["cross_expert_errors"])


def test_cross_expert_counts_by_hand():
    task_of = torch.tensor([0, 0, 1, 1, 2])
    labels = torch.tensor([0, 0, 2, 3, 4, 4])
    pred = torch.tensor([0, 1, 3, 0, 4, 2])  # right, same-task error, same-task, cross, right, cross
    assert cross_expert.cross_expert_counts(pred, labels, task_of) == (4, 2)


# -- inference -----------------------------------------------------------------------------------

def test_inference_rows(inference_run, pool_dir):
    result, out, _ = inference_run
    check_provenance(result, "inference", pool_dir)
    rows = result["rows"]
    assert {(r["model"], r["n"], r["batch"]) for r in rows if r["format"] == "module"} == {
        (m, n, b) for m in ("fused", "reference") for n in (1, 5) for b in (1, 256)} | {
        ("oracle", None, 1), ("oracle", None, 256)}
    # Every model file format, for the largest query: fused and reference at each batch size.
    assert {(r["format"], r["model"], r["n"], r["batch"]) for r in rows if r["format"] != "module"} == {
        (f, m, 5, b) for f in ("torchscript", "pt2", "onnx") for m in ("fused", "reference") for b in (1, 256)}
    assert len({(r["format"], r["model"], r["n"], r["batch"]) for r in rows}) == len(rows)  # one thread count
    for r in rows:
        assert r["images_per_s"] > 0 and r["calls"] >= 3 and r["median_ms"] > 0 and r["params"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3), rel=1e-3)
        if r["model"] != "oracle":
            assert r["max_abs_diff_fused_reference"] < 1e-4
        if r["format"] != "module":  # each file, as loaded, computes the composed model's function
            assert r["max_abs_diff_vs_eager"] < 1e-4 and r["file_bytes"] > 0
    assert set(result["summary"]) == {"n1_b1", "n1_b256", "n5_b1", "n5_b256"}
    assert all(v["fused_over_reference"] > 0 and v["fused_over_oracle"] > 0 for v in result["summary"].values())
    assert "Target: fused >= 1.5x reference for 5 experts" in out


def test_inference_reports_every_format(inference_run):
    result, out, _ = inference_run
    (threads,) = result["threads"]
    assert set(result["format_summary"]) == {"n5_b1", "n5_b256"}
    for key, by_threads in result["format_summary"].items():
        entry = by_threads[str(threads)]
        assert set(entry["formats"]) == {"torchscript", "pt2", "onnx"}
        for fmt, v in entry["formats"].items():
            row = {r["model"]: r for r in result["rows"] if r["format"] == fmt and f"n{r['n']}_b{r['batch']}" == key}
            assert (v["fused"], v["reference"]) == (row["fused"]["images_per_s"], row["reference"]["images_per_s"])
            assert v["fused_over_reference"] == pytest.approx(v["fused"] / v["reference"], abs=1e-3)
        fastest = entry["fastest"]
        assert fastest["images_per_s"] == max(v[m] for v in entry["formats"].values() for m in ("fused", "reference"))
        assert entry["formats"][fastest["format"]][fastest["model"]] == fastest["images_per_s"]
    assert "**Model files, 5 expert(s) (" in out and f"{threads} intra-op thread(s), 1 inter-op" in out
    for fmt, loader in inference.LOADED_WITH.items():
        assert f"| {fmt} | {loader} | fused |" in out
    assert f"Fastest file at {threads} thread(s): batch 1: " in out


def test_inference_without_onnxruntime_says_so(random_pool, monkeypatch):
    """onnxruntime is a dev dependency: without it the ONNX rows say so and the rest is measured."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    s = inference.InferenceSettings(sizes=(1,), batch_sizes=(1,), warmup=0, repeats=1, min_seconds=0.0, threads=(1,),
                                    formats=("torchscript", "onnx"))
    result = inference.run_inference(random_pool, s)
    onnx = [r for r in result["rows"] if r["format"] == "onnx"]
    assert [r["model"] for r in onnx] == ["fused", "reference"]
    assert all(r["images_per_s"] is None and r["not_measured"] == inference.NO_ONNXRUNTIME for r in onnx)
    assert {r["format"] for r in result["rows"] if r["images_per_s"]} == {"module", "torchscript"}
    assert set(result["format_summary"]["n1_b1"]["1"]["formats"]) == {"torchscript"}
    text = inference.markdown(report.stamp(result, quick=True, hw=report.hardware("cpu"), command=None,
                                           started=time.time()))
    assert "| onnx | onnxruntime `InferenceSession` | fused, reference | – | not measured: onnxruntime is not " \
           "installed" in text
    assert "| torchscript | `torch.jit.load` | fused |" in text


def test_quick_mode_of_every_part_is_quick(baselines_run, cross_expert_run, inference_run):
    """DESIGN: the quick mode of all parts together runs in well under two minutes."""
    assert baselines_run[2] + cross_expert_run[2] + inference_run[2] < 120


# -- docs, queries, command line -----------------------------------------------------------------

def test_every_part_wrote_its_own_section(baselines_run, cross_expert_run, inference_run, docs):
    text = docs.read_text()
    for part, (result, _, _) in (("baselines", baselines_run), ("cross-expert", cross_expert_run),
                                 ("inference", inference_run)):
        start, end = report.markers(part)
        assert text.count(start) == 1 and text.count(end) == 1
        assert result["command"] in text[text.index(start):text.index(end)]


def test_update_docs_replaces_only_its_section(tmp_path):
    page = tmp_path / "B.md"
    start, end = report.markers("inference")
    page.write_text(f"# Bench\n\nintro\n\n{start}\nold figures\n{end}\n\n<!-- bench:other:start -->\nkeep\n"
                    "<!-- bench:other:end -->\n")
    report.update_docs(page, "inference", "new figures")
    report.update_docs(page, "inference", "newer figures")
    text = page.read_text()
    assert f"{start}\nnewer figures\n{end}" in text and "old figures" not in text and "new figures\n" not in text
    assert "intro" in text and "<!-- bench:other:start -->\nkeep\n<!-- bench:other:end -->" in text
    report.update_docs(page, "baselines", "table", baselines.TITLE)  # a missing section is appended, with a title
    assert text in page.read_text() and page.read_text().rstrip().endswith(report.markers("baselines")[1])
    assert f"\n## {baselines.TITLE}\n\n{report.markers('baselines')[0]}\ntable\n" in page.read_text()
    page.write_text(f"{start}\nno end marker\n")
    with pytest.raises(InvalidArgument, match="malformed markers"):
        report.update_docs(page, "inference", "x")
    fresh = report.update_docs(tmp_path / "new" / "B.md", "inference", "x")
    assert fresh.read_text().startswith("# Benchmarks")


def test_select_queries(random_pool):
    every = common.select_queries(random_pool, range(1, 6))
    assert len(every) == 31 == len(set(every))
    sample = common.select_queries(random_pool, range(1, 6), 7, seed=3)
    assert sample == common.select_queries(random_pool, range(1, 6), 7, seed=3)
    assert len(sample) == 7 == len(set(sample)) and {len(q) for q in sample} == {1, 2, 3, 4, 5}
    assert sample == sorted(sample, key=every.index)
    assert common.select_queries(random_pool, range(1, 6), 100) == every
    assert {len(q) for q in common.select_queries(random_pool, range(2, 6))} == {2, 3, 4, 5}


def test_settings_presets_and_overrides():
    s = baselines.settings(quick=True, epochs=3, lr=None)
    assert s.epochs == 3 and s.lr == baselines.QUICK.lr  # None: the preset's value
    assert baselines.settings(quick=False).queries == 0  # full runs: every query
    assert inference.settings(quick=True, sizes=(2,)).sizes == (2,)
    assert cross_expert.settings(quick=True).epochs == 1 and cross_expert.settings().epochs == 10
    with pytest.raises(InvalidArgument, match="must be >= 1"):  # overrides go through the settings' checks
        baselines.settings(quick=True, epochs=0)
    with pytest.raises(TypeError):  # a field no benchmark has
        inference.settings(quick=True, epochs=3)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is not available")


@pytest.mark.parametrize("args, message", [
    (["bench", "baselines", "--pool", "{tmp}/nowhere"], "not a pool directory"),
    (["bench", "baselines", "--pool", "{pool}", "--quick", "--device", "gpu"], "unknown device 'gpu'"),
    (["bench", "cross-expert", "--pool", "{pool}", "--quick", "--device", "cuda0"], "unknown device 'cuda0'"),
    pytest.param(["bench", "baselines", "--pool", "{pool}", "--quick", "--device", "cuda"],
                 "CUDA is not available", marks=NO_CUDA),
    pytest.param(["bench", "cross-expert", "--pool", "{pool}", "--quick", "--device", "cuda:1"],
                 "CUDA is not available", marks=NO_CUDA),
    # The device is checked before any work, even before the pool is loaded.
    pytest.param(["bench", "baselines", "--pool", "{tmp}/nowhere", "--device", "cuda"],
                 "CUDA is not available", marks=NO_CUDA),
    (["bench", "baselines", "--pool", "{pool}", "--quick", "--methods", "scratch,magic"], "unknown baselines"),
    (["bench", "inference", "--pool", "{pool}", "--quick", "--sizes", "7"], "no query sizes"),
    (["bench", "inference", "--pool", "{pool}", "--quick", "--formats", "pt2,tflite"], "formats: distinct names"),
    (["bench", "inference", "--pool", "{pool}", "--quick", "--format-sizes", "3"], "must be among the query sizes"),
    (["bench", "cross-expert", "--pool", "{pool}", "--quick", "--max-tasks", "1"], "at least 2 primitive tasks"),
])
def test_bad_input_is_one_line(pool_dir, tmp_path, args, message):
    rc, _, err = run_cli(*[a.format(pool=pool_dir, tmp=tmp_path) for a in args])
    lines = err.strip().splitlines()
    assert rc == (EXIT_NOT_FOUND if message == "not a pool directory" else EXIT_INVALID_ARGUMENT), err
    assert lines[-1].startswith("poe: error:") and message in lines[-1], err


# -- --device ------------------------------------------------------------------------------------

def test_default_device_is_the_cpu(baselines_run, cross_expert_run):
    for bench, result, line in ((baselines, baselines_run[0], "baselines trained on the CPU"),
                                (cross_expert, cross_expert_run[0], "ablation experts trained on the CPU")):
        assert result["settings"]["device"] == "cpu" and result["hardware"]["device"] == "cpu"
        assert "gpu" not in result["hardware"]
        assert line in bench.markdown(result)


def test_device_cpu_quick(pool_dir, tmp_path):
    """`--device cpu` is the default, stated: the same run, and the command line records it."""
    docs = tmp_path / "B.md"
    # (options in the order `poe bench` states them in the command line)
    result, out, _ = run_part("baselines", pool_dir, docs, tmp_path, "--queries", "1", "--methods", "transfer,ckd",
                              "--device", "cpu")
    assert result["settings"]["device"] == "cpu" and "--device cpu" in result["command"]
    assert result["queries"] == 1 and all(in_unit(result["rows"][0][m]["accuracy"]) for m in ("transfer", "ckd"))
    assert "baselines trained on the CPU; PoE composed and evaluated on the CPU" in out
    result, out, _ = run_part("cross-expert", pool_dir, docs, tmp_path, "--max-tasks", "2", "--device", "cpu")
    assert result["settings"]["device"] == "cpu" and result["expert_sets"]["soft"]["source"] == "trained"
    assert "ablation experts trained on the CPU" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks CUDA where it is available")
def test_device_auto_without_cuda_is_the_cpu():
    assert common.bench_device("auto") == "cpu" and common.bench_device("cpu") == "cpu"
    with pytest.raises(InvalidArgument, match="CUDA is not available"):
        common.bench_device("cuda:0")


def test_device_names_are_checked():
    for name in ("gpu", "cuda:", "cuda:x", "CPU", "mps", ""):
        with pytest.raises(InvalidArgument, match="unknown device"):
            baselines.settings(quick=True, device=name)
    assert cross_expert.settings(quick=True, device="cuda:3").device == "cuda:3"  # checked at run


def test_cross_expert_checkpoint_key_of_the_cpu_is_unchanged(random_pool):
    """Existing CPU runs resume: the CPU's work-dir key is the one it was before --device existed;
    experts trained on a GPU get their own."""
    import hashlib

    from poe.engine import pool as pool_mod
    from poe.engine.data import Dataset
    from poe.engine.train import TeacherViews

    g = torch.Generator().manual_seed(0)
    train = Dataset("random", torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=g),
                    torch.arange(8) % 10, tuple(random_pool.hierarchy.classes))
    views = TeacherViews(train.images, torch.randn(8, 10, generator=g))
    s = cross_expert.CrossExpertSettings(epochs=1, batch_size=64, views=1)
    h = hashlib.sha256(pool_mod.tensors_to_bytes(random_pool.library_state))
    h.update(train.labels.numpy().tobytes())
    h.update(views.logits[:1000].numpy().tobytes())
    h.update(str((len(views), s.epochs, s.batch_size, s.lr, s.seed, cross_expert.VARIANTS["soft"][1])).encode())
    before = f"{random_pool.name}-{random_pool.version}-soft-{h.hexdigest()[:12]}"
    assert cross_expert._settings_key(random_pool, train, views, "soft", s) == before
    for device in ("cuda", "cuda:1"):
        cuda = cross_expert._settings_key(random_pool, train, views, "soft", dataclasses.replace(s, device=device))
        assert cuda != before and cuda.startswith(f"{random_pool.name}-{random_pool.version}-soft-")


def test_hardware_names_the_device():
    hw = report.hardware("cpu")
    assert hw["device"] == "cpu" and "gpu" not in hw and "GPU" not in report.hardware_line(hw)
    gpu = dict(hw, device="cuda", gpu="NVIDIA H200", cuda="13.0")
    assert "GPU NVIDIA H200 (CUDA 13.0)" in report.hardware_line(gpu)
    assert report.device_label("cuda", gpu) == "the GPU NVIDIA H200 (cuda)"
    assert report.device_label("cpu", gpu) == "the CPU"


def test_help_of_every_part():
    for part in ("baselines", "cross-expert", "inference"):
        with pytest.raises(SystemExit) as e:
            run_cli("bench", part, "--help")
        assert e.value.code == 0


def test_one_class_queries_are_left_out_of_the_speedup():
    """An untrained model already gets a one-class query right: its 'time to PoE's accuracy' is noise."""
    def row(classes, speedup):
        m = {"accuracy": 1.0, "best_monitor_accuracy": 1.0, "params": 1, "flops": 1, "reached": True,
             "time_to_target_s": 1.0, "train_s": 1.0}
        return {"n": 1, "classes": classes, "speedup_vs_fastest": speedup,
                "oracle": {"accuracy": 1.0, "params": 9, "flops": 9},
                "poe": {"accuracy": 1.0, "params": 1, "flops": 1, "compose_s": 0.005}, "transfer": m}

    summary = baselines.summarize_baselines([row(["Bag"], 2.0), row(["Sandal", "Sneaker"], 5000.0)], ("transfer",))
    sp = summary["all"]["speedup_vs_fastest"]
    assert sp == {"queries": 1, "median": 5000.0, "min": 5000.0, "one_class_queries_left_out": 1}


# -- pool ----------------------------------------------------------------------------------------

def test_bench_pool_local(pool_dir, tmp_path, random_pool, fmnist_test):
    """`poe bench pool`: every query against the restricted oracle, the summary consistent with its rows."""
    import numpy as np

    small = fmnist_test.stratified(30, 0)  # real test images, few of them (--dataset takes an .npz)
    data = tmp_path / "fmnist-300.npz"
    np.savez(data, images=small.images.numpy(), labels=small.labels.numpy(), classes=np.array(small.classes))
    json_out = tmp_path / "pool.json"
    rc, out, err = run_cli("bench", "pool", "--pool", str(pool_dir), "--dataset", str(data), "--max-tasks", "2",
                           "--json-out", str(json_out))
    assert rc == 0, err
    summary = json.loads(json_out.read_text())
    rows = summary["rows"]
    assert summary["pool"] == summary["oracle_from"] == "test-pool@1" and summary["served_by"] is None
    assert summary["queries"] == len(rows) == 5 + 10 and summary["test_images"] == 300
    assert all(r["images"] == 30 * len(r["class_ids"]) for r in rows)
    assert [r["tasks"] for r in rows[:5]] == [[t] for t in random_pool.experts]
    assert summary["mean_delta_pt"] == pytest.approx(100 * sum(r["delta"] for r in rows) / len(rows), abs=1e-3)
    assert summary["worst_delta_pt"] == pytest.approx(100 * min(r["delta"] for r in rows), abs=1e-3)
    assert summary["one_task_params_max"] == max(r["params"] for r in rows if r["n"] == 1)
    lines = out.strip().splitlines()
    assert len(lines) == 1 + len(rows) + 1 and lines[-1].startswith("15 queries on 300 test images")


@pytest.mark.parametrize("args, message", [
    (["--target", "127.0.0.1:1"], "--target and --served go together"),
    (["--max-tasks", "0"], "max tasks must be >= 1"),
])
def test_bench_pool_bad_input_is_one_line(pool_dir, args, message):
    rc, _, err = run_cli("bench", "pool", "--pool", str(pool_dir), *args)
    lines = err.strip().splitlines()
    assert rc == EXIT_INVALID_ARGUMENT and lines[-1].startswith("poe: error:") and message in lines[-1], err
