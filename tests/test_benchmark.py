"""The benchmark's trace reading: where the device waited during a profiled step."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchmark import TRACED_STEP, device_gaps  # noqa: E402


def event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_device_gaps_finds_idle_device_time_and_what_the_host_did():
    events = [
        event("user_annotation", TRACED_STEP, 0, 1000),
        event("cpu_op", "aten::linear", 0, 300),
        event("cpu_op", "aten::mm", 100, 150),
        event("kernel", "gemm", 250, 200),  # 250 us idle first: the host was in linear > mm
        event("kernel", "gelu", 455, 40),  # 5 us: under the threshold
        event("cuda_runtime", "cudaGraphLaunch", 500, 100),
        event("kernel", "graph kernel", 700, 250),  # 205 us idle while the graph was launched
        event("gpu_memcpy", "Memcpy DtoH", 962, 10),  # 28 us left at the end
        event("kernel", "outside the step", 2000, 50),
    ]
    report = device_gaps(events).splitlines()
    assert report[0] == "step 0: wall 1.00 ms, device busy 0.50 ms (50%), 3 gaps of 20 us or more: 0.48 ms"
    assert report[1] == "   0.250 ms at +  0.00 ms | host: aten::linear > aten::mm | then: gemm"
    assert report[2] == "   0.205 ms at +  0.49 ms | host: cudaGraphLaunch | then: graph kernel"
    assert report[3].startswith("   0.028 ms at +  0.97 ms | host: (nothing traced) | then: (end of step)")


def test_the_own_data_benchmark_times_conversion_and_samples_on_both_row_forms():
    import data_samples

    results = data_samples.main(["--own_data", "--num_images", "4", "--samples", "4", "--repeats", "1"])
    assert set(results) == {
        "conversion, 1 process(es)",
        f"conversion, {max(2, __import__('os').cpu_count() or 1)} process(es)",
        "PhraseCut rows (polygons)",
        "converted own rows (PNG masks)",
    }
    assert all(value > 0 for figures in results.values() for values in figures.values() for value in values)


def test_the_presence_scores_roc_auc_and_best_accuracy_against_hand_counts():
    import numpy as np
    from presence_score import best_accuracy, roc_auc

    present, absent = np.array([0.9, 0.4, 0.6]), np.array([0.5, 0.4, 0.1])
    # pairs (p, a) with p > a: 0.9 beats 3, 0.6 beats 3, 0.4 beats 0.1 and ties 0.4 (a half): 7.5 of 9
    assert roc_auc(present, absent) == 7.5 / 9
    assert best_accuracy(present, absent) == (5 / 6, 0.5)  # present if > 0.5: 0.9, 0.6 right; 0.4 wrong
