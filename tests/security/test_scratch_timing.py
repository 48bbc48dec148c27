import time, grpc
from hypothesis import strategies as st
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fz", __file__.replace("test_scratch_timing", "test_fuzz")); fz = importlib.util.module_from_spec(spec); sys.modules["fz"] = fz; spec.loader.exec_module(fz)
from fz import stored_state, listed_state, request_strategy, call, target  # noqa

def test_timing(target):
    t0 = time.perf_counter()
    for _ in range(20):
        stored_state(target)
    print("stored_state ms", (time.perf_counter() - t0) / 20 * 1000)
    for m in ["/poe.v1.Registry/GetPool", "/poe.v1.Extractor/WatchExtraction", "/poe.v1.Registry/ListPools",
              "/poe.v1.Composer/DescribeComposition", "/poe.v1.Extractor/GetExtraction"]:
        strat = request_strategy(target, m)
        reqs = [strat.example() for _ in range(20)]
        t0 = time.perf_counter()
        for _ in range(20):
            request_strategy(target, m).example()
        gen = (time.perf_counter() - t0) / 20 * 1000
        times = []
        for r in reqs:
            t0 = time.perf_counter(); code = call(target, m, r); times.append(((time.perf_counter() - t0) * 1000, code.name, len(r)))
        times.sort(reverse=True)
        print(m, "gen ms", gen, "calls", times[:4], sum(t for t, *_ in times) / 20)

def test_timing2(target):
    t0 = time.perf_counter()
    for _ in range(20):
        listed_state(target)
    print("listed_state ms", (time.perf_counter() - t0) / 20 * 1000)
