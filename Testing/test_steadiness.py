"""The benchmark's host-steadiness probe: a fixed product timed before each unit, its spread, and the warning.

No timing is asserted: the probes are real, but only their bookkeeping is checked, and the spread's arithmetic
and warning on given probe times.
"""
from FastSAM3DLib.benchmarks import report, steadiness


def _document(measurements):
    return {"schema": report.SCHEMA, "kind": "bench", "date": "2026-12-01", "environment": {},
            "measurements": measurements}


def test_each_sample_times_the_reference_product_and_is_recorded_in_order():
    probe = steadiness.Steadiness(repeats=1)
    first, second = probe.sample("encoder"), probe.sample("decoder")
    assert first > 0 and second > 0
    assert [title for title, _ in probe.samples] == ["encoder", "decoder"]
    assert probe.spread() >= 1.0
    measurement = probe.measurement("test CPU")
    assert report.validate(_document([measurement])) == []
    assert measurement["name"] == steadiness.MEASUREMENT and measurement["value"] == probe.spread()
    assert "over 2 probes" in measurement["note"]
    details = probe.details()
    assert details["shape"] == list(steadiness.PROBE_SHAPE) and [p[0] for p in details["probes"]] == ["encoder",
                                                                                                    "decoder"]


def test_spread_and_warning_from_given_probe_times():
    probe = steadiness.Steadiness(repeats=1)
    probe.samples = [("a", 4.0), ("b", 6.0), ("c", 5.0)]
    assert probe.spread() == 1.5
    assert "1.50x" in probe.warning() and "ranges" in probe.warning()
    assert "4.0-6.0 ms (median 5.0) over 3 probes" in probe.summary()
    probe.samples = [("a", 4.0), ("b", 4.4)]
    assert probe.warning() is None  # 1.1x: a steady machine
    probe.samples = [("a", 4.0)]
    lone = probe.measurement("test CPU")
    assert lone["value"] is None and "fewer than two probes" in lone["skipped"]
    assert report.validate(_document([lone])) == []


def test_warning_from_a_results_measurements():
    probe = steadiness.Steadiness(repeats=1)
    probe.samples = [("a", 2.0), ("b", 3.0)]
    unsteady = [probe.measurement("cpu")]
    probe.samples = [("a", 2.0), ("b", 2.1)]
    steady = [probe.measurement("cpu")]
    assert "1.50x" in steadiness.warning(unsteady)
    assert steadiness.warning(steady) is None
    assert steadiness.warning([]) is None  # results from before the probe existed
