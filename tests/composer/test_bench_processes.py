"""`poe bench compose`'s throughput case against two composer processes sharing one port."""


def test_bench_throughput_against_two_composer_processes(pool_dir, tmp_path):
    from poe.bench import compose as bench

    result = bench.run(pool_dir, tmp_path, per_case=1, cold=1, clients=4, throughput_requests=12, s3=False,
                       processes=2)
    tput = result["throughput"]
    assert tput["processes"] == 2 and tput["n"] == 12 and tput["compositions_per_s"] > 0
    assert tput["server_cpu_ms_per_request"] > 0 and tput["archive_templates_made"] == 0
    assert "against 2 composer processes sharing the port" in bench.markdown(result, "poe bench compose")
