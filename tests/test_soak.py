"""bench.soak: its bombs are what they claim to be, and its report excuses only the killed worker's requests."""

from __future__ import annotations

import io

from PIL import Image

from bench.loadgen import photo_jpeg
from bench.soak import Record, jpeg_bomb, png_bomb, report, scans_bomb


def test_the_bombs_claim_what_they_say(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own bomb check would refuse to say their size
    jpeg = photo_jpeg(64, 48)
    assert Image.open(io.BytesIO(png_bomb())).size == (60_000, 60_000)
    assert Image.open(io.BytesIO(jpeg_bomb(jpeg))).size == (60_000, 60_000)
    many = scans_bomb(jpeg, scans=300)
    assert many.count(b"\xff\xda") > 300  # its own scans and the repeated one
    image = Image.open(io.BytesIO(many))
    image.load()  # a valid image, whose every scan a decoder walks
    assert image.size == (64, 48)


def test_only_requests_in_flight_on_the_killed_worker_are_excused():
    def good(start, end, status):
        return Record("good", start, end, status)

    baseline = [good(0, 0.1, 200)] * 100
    load = [good(10, 10.1, 200)] * 100 + [
        good(19.5, 20.2, 0),  # in flight when the worker was killed at 20: excused
        Record("slow_big", 5, 20.5, 0),  # excused too
        good(30, 30.1, 0),  # a connection error later: counted
        Record("slow_big", 40, 40.1, 503),  # a body refused for the byte budget: by design
    ]
    rss = {"start": 1000.0, "after_slow_bodies_end": 1100.0}
    out = report(baseline, load, {"at": 20.0, "pid": 1}, rss)
    assert out["killed_worker"]["requests_in_flight_lost"] == {"good": 1, "slow_big": 1}
    assert out["load"]["good"]["statuses"] == {"200": 100, "error: ": 1}
    assert out["load"]["slow_big"]["statuses"] == {"503": 1}
    assert out["targets"] == {
        "no_5xx_for_well_behaved_requests_or_bombs": True,
        "well_behaved_p99_within_2x_of_baseline": True,
        "rss_within_150_mb_of_start_10_s_after_the_slow_bodies_end": True,
    }
    load.append(good(50, 50.1, 500))
    assert not report(baseline, load, {"at": 20.0, "pid": 1}, rss)["targets"][
        "no_5xx_for_well_behaved_requests_or_bombs"
    ]
