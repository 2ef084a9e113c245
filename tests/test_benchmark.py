"""The benchmark's JSON output with short settings (numbers are reported, never asserted as targets)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from tests import processes

# Each command here takes 19-36 s (2026-12-06, 2-core CPU, two tests at once): about 5x that.
BENCH_TIMEOUT_S = 180

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_speed.py"


def test_benchmark_json_has_every_row_and_the_machine(small_synth, tmp_path):
    out = tmp_path / "bench.json"
    r = processes.run([sys.executable, str(BENCH), "--data", str(small_synth), "--device", "cpu", "--image-size", "32",
                        "--batch-size", "32", "--workers", "1", "--epochs", "1", "--limit", "96", "--train",
                        "--json", str(out)], timeout=BENCH_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    rows = {(x["row"], x["train"]): x for x in report["results"]}
    loaders = ("torch", "dali", "torch-store", "dali-store")
    assert set(rows) == {(kind, train) for kind in loaders for train in (False, True)} | {("ceiling", True)}
    for (kind, train), row in rows.items():
        assert row["images_per_epoch"] == 96
        assert row["images_per_s"] > 0 and row["cpu_s_per_1000_images"] > 0 and row["peak_host_memory_mb"] > 10
        if train:
            assert 0 <= row["data_wait_fraction"] < 1
        # the store rows read the decoded store, the others the PNGs (their index has no store column)
        assert row["reads"] == ("decoded store" if kind.endswith("-store") else "PNG"), kind
        if kind.endswith("-store"):
            png = rows[(kind.removesuffix("-store"), train)]
            assert row["ratio_to_png"] == row["images_per_s"] / png["images_per_s"]
    assert rows[("torch", False)]["ratio_to_torch"] == 1.0
    # The store was built for the run, cold, in one pass with the check, and timed; then removed.
    build = report["store_build"]
    assert build["samples"] == 96 and build["case"].startswith("cold")
    assert build["build_seconds"] > 0 and build["build_samples_per_s"] == 96 / build["build_seconds"]
    assert build["check_alone_seconds"] > 0 and build["disk_mb"] > 0
    assert "decoded store: 96 samples checked and stored" in r.stdout and "x PNG" in r.stdout
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "x torch" in r.stdout and "ceiling" in r.stdout
    # 96 samples in batches of 32: 3 batches an epoch, mostly prefetched before the clock starts.
    assert report["settings"]["batches_per_epoch"] == 3 and report["settings"]["too_short_to_measure"]
    assert "too short to measure" in r.stderr and "rates are overstated" in r.stdout


def test_profile_writes_a_chrome_trace_and_a_table_of_ranges(small_synth, tmp_path):
    out, prof = tmp_path / "bench.json", tmp_path / "prof"
    r = processes.run([sys.executable, str(BENCH), "--data", str(small_synth), "--device", "cpu", "--image-size", "32",
                        "--batch-size", "16", "--workers", "1", "--epochs", "1", "--limit", "48", "--profile", str(prof),
                        "--loader", "dali", "--profile-steps", "4", "--json", str(out)],
                       timeout=BENCH_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    p = row["profile"]
    assert p["steps"] == 4
    assert set(p["ranges"]) == {"data_wait", "h2d_copy", "forward", "backward", "optimizer_step"}
    top = [k for k in p["ranges"] if k != "h2d_copy"]  # h2d_copy is inside data_wait
    assert abs(sum(p["ranges"][k]["share"] for k in top) - 1) < 1e-6
    assert all(p["ranges"][k]["total_ms"] > 0 for k in ("forward", "backward", "optimizer_step"))
    # The trace is Chrome-trace JSON (what Perfetto and TensorBoard read) holding our named ranges.
    trace = json.loads((prof / "dali.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"data_wait", "forward", "backward", "optimizer_step", "h2d_copy"} <= names
    assert "ms/step" in r.stdout and "forward" in r.stdout
    # The loader's own CPU is reported apart from the main thread's (per thread, in clock ticks: a few dozen
    # tiny images may cost the loader less than one tick, so only the bounds are certain).
    total = row["cpu_s_per_1000_images"]
    assert 0 <= row["loader_cpu_s_per_1000_images"] <= total + 1 and 0 < row["main_cpu_s_per_1000_images"] <= total + 1


# A process below a child, as torch's workers are below the forkserver: it burns this much CPU, says so on
# stdout and waits on stdin, alive and nobody's exited child.
BURN_S = 0.3
GRANDCHILD = f"""import sys, time
while time.process_time() < {BURN_S}:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_the_cpu_probe_counts_a_live_process_below_a_child():
    """torch's persistent workers are children of a forkserver: they neither exit during a row nor are the
    row's children, and their CPU is the loader's all the same."""
    spec = importlib.util.spec_from_file_location("probes", BENCH.parent / "probes.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}])"
    before = probes.cpu_snapshot()
    with processes.started([sys.executable, "-c", child], timeout=BENCH_TIMEOUT_S, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline() == "burnt\n"
        cpu = probes.cpu_delta(before, probes.cpu_snapshot())
        peak_kb = probes.descendants_peak_rss_kb()
        proc.stdin.close()
        proc.wait()
    # what the grandchild's own clock counted, less the /proc tick's rounding
    assert cpu["total"] >= BURN_S - 0.05 and cpu["loader"] >= BURN_S - 0.05, cpu
    assert peak_kb > 1000


def test_cost_by_size_has_the_check_cold_warm_and_with_the_store_and_each_loader_per_size(tmp_path):
    out, cache = tmp_path / "cost.json", tmp_path / "cache"
    env = dict(os.environ, DALIPIPE_CACHE_DIR=str(cache))  # the sets it draws go here, not to the user's cache
    r = processes.run([sys.executable, str(BENCH), "--source-sizes", "16,48", "--image-size", "32", "--limit", "32",
                       "--batch-size", "16", "--workers", "1", "--epochs", "1", "--device", "cpu",
                       "--gpu-step-rate", "1000", "--json", str(out)], timeout=BENCH_TIMEOUT_S, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["machine"]["cpu_count"] >= 1
    rows = {(x["source_size"], x["row"]): x for x in report["results"]}
    kinds = ("check-cold", "check-warm", "check-store", "torch", "dali", "torch-store", "dali-store")
    assert sorted(rows) == sorted((size, kind) for size in (16, 48) for kind in kinds)
    for (size, kind), row in rows.items():
        assert row["images_per_s"] > 0 and row["peak_host_memory_mb"] > 10, (size, kind)
        assert (cache / f"bench-synthetic-{size}px-n32-v1" / "y_train.csv").is_file()
        if kind.startswith("check"):
            # cold: the check's memory is empty; warm: it holds every sample the cold run checked; store: its
            # own memory, empty, and an empty store that it fills
            assert row["samples"] == 32 and row["remembered_before"] == (32 if kind == "check-warm" else 0)
            assert (row.get("store_disk_mb", 0) > 0) == (kind == "check-store")
        else:
            assert row["images_per_epoch"] == 32 and row["cpu_s_per_1000_images"] > 0
            assert row["images_per_s_per_core"] == 1000 / row["cpu_s_per_1000_images"]
            assert row["projected_images_per_s"] == 16 * row["images_per_s_per_core"]
            assert row["limit"] in ("decoding limits", "keeps up")
    # The step rate is the user's, and said to be so; the projection is said to be an estimate.
    settings = report["settings"]
    assert settings["gpu_step_rate_images_per_s"] == 1000 and "not measured" in settings["gpu_step_rate_source"]
    assert settings["projection"].startswith("estimate")
    table = {(int(m[1]), m[2].replace(" ", "-")) for m in
             re.finditer(r"^ *(\d+) +(check cold|check warm|check store|torch store|dali store|torch|dali) ",
                         r.stdout, flags=re.M)}
    assert table == set(rows), r.stdout
    assert "not measured" in r.stdout and "estimate" in r.stdout
    assert out.with_suffix(".png").stat().st_size > 1000
    # the stores it built for the run are gone; the synthetic sets stay
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("bench-store")) == []


def test_cost_by_size_refuses_a_size_it_cannot_draw_and_the_other_modes(tmp_path):
    for args, said in [(["--source-sizes", "64,abc"], "--source-sizes takes sides in pixels"),
                       (["--source-sizes", "8"], "--source-sizes: each side must be in [16, 4096], got 8"),
                       (["--source-sizes", "64", "--train"], "without --train"),
                       (["--gpu-step-rate", "100"], "give both")]:
        r = processes.run([sys.executable, str(BENCH), *args], timeout=BENCH_TIMEOUT_S,
                          env=dict(os.environ, DALIPIPE_CACHE_DIR=str(tmp_path)))  # should one go on: not the user's
        assert r.returncode == 1 and said in r.stderr, (args, r.stderr[-2000:])


def test_record_cost_reports_each_setting_and_fsync_delay(tmp_path):
    out = tmp_path / "cost.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "record_cost.py"
    r = processes.run([sys.executable, str(script), "--settings", "tiny", "--epochs", "1", "2", "--fsync-delay", "0",
                        "--fsync-delay", "0.05", "--json", str(out)], timeout=BENCH_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["setting"], x["fsync_delay_s"]) for x in rows] == [("tiny", 0.0), ("tiny", 0.05)]
    for row in rows:
        assert row["epochs"] == [1, 2] and row["steps_per_epoch"] >= 2
        # differences of two runs' wall times on a shared machine: reported, either side of 0 by chance
        assert all(math.isfinite(row[k]) for k in ("per_epoch_wall_s", "per_epoch_steps_s", "epoch_end_in_loop_s"))
        assert abs(row["outside_steps_s"] - (row["per_epoch_wall_s"] - row["per_epoch_steps_s"])) <= 0.002  # rounding
    assert "outside s" in r.stdout
