"""bench/: the benchmarks measure what they claim (same weights everywhere, loopback only, honest summaries)."""

from __future__ import annotations

import pytest
import torch

from bench import common, loadgen


def test_every_library_gets_the_same_weights():
    """Ours, timm and transformers on one random state dict agree (what the ratios in bench.raw rely on)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from app.model import VisionTransformer

    sd = common.random_state_dict("ti16", seed=3)
    ours = VisionTransformer(common.vit_config("ti16")).eval()
    ours.load_state_dict(sd)
    timm_net = common.timm_model("ti16")
    timm_net.load_state_dict(sd)
    hf = common.hf_model("ti16", sd)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = ours(x)
        assert want.std() > 0.01  # a random head, not a zero one: the comparison has teeth
        torch.testing.assert_close(timm_net(x), want, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(hf(pixel_values=x).logits, want, atol=1e-4, rtol=1e-3)


def test_native_checkpoint_loads_in_the_engine(tmp_path):
    from app.engine import load_model

    path = common.write_native_checkpoint("ti16", tmp_path)
    model = load_model(str(path), device="cpu", dtype="float32")
    assert model.info["embed_dim"] == 192 and model.info["num_classes"] == common.NUM_CLASSES


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000/v1/classify", "http://example.com/", "http://0.0.0.0:80/"])
def test_load_generator_refuses_anything_but_loopback(url):
    with pytest.raises(SystemExit, match="loopback"):
        loadgen.check_loopback(url)
    loadgen.check_loopback("http://127.0.0.1:8000/v1/classify")


def test_summary_counts_only_successes_as_throughput():
    samples = [loadgen.Sample(0.1, 200, 2), loadgen.Sample(0.3, 200, 2), loadgen.Sample(0.05, 503, 2)]
    load = loadgen.Load(url="http://127.0.0.1:1/", jpeg=b"", images_per_request=2, concurrency=2)
    row = loadgen.summarise(samples, elapsed=2.0, load=load)
    assert row["images_per_s"] == 2.0 and row["requests"] == 3 and row["ok"] == 2
    assert row["errors"] == {"503": 1}
    assert row["latency_ms"]["p50"] == pytest.approx(200.0)


def test_percentile_interpolates():
    assert common.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert common.percentile([5], 99) == 5


def test_photo_jpeg_has_the_asked_size():
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(loadgen.photo_jpeg(64, 48)))
    assert img.size == (64, 48) and img.format == "JPEG"


def test_raw_bench_runs_and_reports_agreement():
    pytest.importorskip("timm")
    from bench import raw

    argv = "--shapes ti16 --batch-sizes 1 --dtypes float32 --impls ours,ours-accel,timm --seconds 0 --min-repeats 1"
    result = raw.main([*argv.split(), "--device", "cpu"])
    (entry,) = result["results"]
    assert set(entry["impls"]) == {"ours", "ours-accel", "timm"}
    assert entry["impls"]["timm"]["max_abs_diff_vs_ours"] < 1e-4
    assert entry["impls"]["ours-accel"]["max_abs_diff_vs_ours"] < 1e-4
    assert "ours-accel/timm" in entry["ratios"]


def test_the_prebuilt_multipart_body_is_read_as_the_images_it_holds():
    """The load generator encodes its body once; a real multipart parser (Starlette's) must read every image."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def count(request):
        form = await request.form()
        files = form.getlist("images")
        return JSONResponse({"n": len(files), "sizes": [len(await f.read()) for f in files]})

    jpeg = loadgen.photo_jpeg(64, 48)
    load = loadgen.Load(url="http://127.0.0.1:1/", jpeg=jpeg, images_per_request=3)
    body, content_type = loadgen.multipart_body(load)
    with TestClient(Starlette(routes=[Route("/", count, methods=["POST"])])) as client:
        answer = client.post("/", content=body, headers={"content-type": content_type}).json()
    assert answer == {"n": 3, "sizes": [len(jpeg)] * 3}
