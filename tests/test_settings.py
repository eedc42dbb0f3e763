"""Settings and the command line: defaults, VIT_* variables, flag precedence, repeatable option pairing."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from app.__main__ import parse_settings
from app.settings import ModelSpec, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("VIT_"):
            monkeypatch.delenv(key)


def test_defaults_are_the_contracts():
    s = Settings()
    assert s.model == [] and s.arch == [] and s.image_size == []
    assert (s.host, s.port, s.device, s.dtype) == ("127.0.0.1", 8000, "auto", "auto")
    assert s.batch_size_for("cuda") == 32 and s.batch_size_for("cpu") == 8
    assert s.max_wait_ms == 5 and s.max_queue == 256 and s.request_timeout_s == 30
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_images_per_request == 64
    assert s.max_image_pixels == 40_000_000 and s.api_key is None and s.log_level == "info"
    assert s.decode_pool == "auto" and s.decode_pool_kind in ("process", "thread")
    assert Settings(decode_pool="process").decode_pool_kind == "process"


def test_every_option_is_a_variable_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("VIT_PORT", "9001")
    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("VIT_API_KEY", "from-env")
    monkeypatch.setenv("VIT_LOG_LEVEL", "DEBUG")
    s = parse_settings([])
    assert (s.port, s.max_batch_size, s.api_key, s.log_level) == (9001, 4, "from-env", "debug")
    s = parse_settings(["--port", "9002", "--api-key", "from-flag", "--max-wait-ms", "2.5"])
    assert (s.port, s.max_batch_size, s.api_key, s.max_wait_ms) == (9002, 4, "from-flag", 2.5)


def test_model_variable_holds_one_value_or_a_json_list(monkeypatch):
    monkeypatch.setenv("VIT_MODEL", "a=/x/a.safetensors")
    assert Settings().model_specs() == [ModelSpec("/x/a.safetensors", "a")]
    monkeypatch.setenv("VIT_MODEL", '["a=/x/a.pth", "hf-hub:google/vit-base-patch16-224"]')
    monkeypatch.setenv("VIT_ARCH", '["vit_b_16", null]')
    monkeypatch.setenv("VIT_IMAGE_SIZE", "384")
    assert Settings().model_specs() == [
        ModelSpec("/x/a.pth", "a", "vit_b_16", 384),
        ModelSpec("hf-hub:google/vit-base-patch16-224", None, None, 384),
    ]


def test_flags_replace_the_variables_list(monkeypatch):
    monkeypatch.setenv("VIT_MODEL", '["a", "b"]')
    monkeypatch.setenv("VIT_ARCH", '["vit_b_16", "vit_l_16"]')
    s = parse_settings(["--model", "c"])
    assert s.model_specs() == [ModelSpec("c")]


def test_arch_and_image_size_pair_with_the_model_they_follow():
    s = parse_settings(
        [
            "--image-size",
            "256",
            "--model",
            "a",
            "--arch",
            "vit_b_16",
            "--model",
            "b=./b.pth",
            "--image-size",
            "384",
            "--model",
            "c",
        ]
    )
    assert s.model_specs() == [
        ModelSpec("a", None, "vit_b_16", 256),
        ModelSpec("./b.pth", "b", None, 384),
        ModelSpec("c", None, None, 256),
    ]


def test_image_size_alone_applies_to_the_repository_models():
    s = parse_settings(["--image-size", "64"])
    assert s.model == [] and s.global_image_size == 64


def test_names_split_only_off_a_plain_name():
    s = Settings(model=["hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "dir/a=b.pth", "x=hf-hub:o/n"])
    assert [(m.name, m.spec) for m in s.model_specs()] == [
        (None, "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        (None, "dir/a=b.pth"),
        ("x", "hf-hub:o/n"),
    ]


def test_max_queue_below_max_images_per_request_is_a_start_up_error(capsys):
    with pytest.raises(ValidationError, match="max_queue"):
        Settings(max_queue=10, max_images_per_request=64)
    with pytest.raises(SystemExit) as stop:
        parse_settings(["--max-queue", "10"])
    assert stop.value.code == 2
    assert "max_queue (10) is smaller than max_images_per_request (64)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--arch", "vit_b_16"],  # before any --model
        ["--device", "tpu"],
        ["--dtype", "float64"],
        ["--max-batch-size", "0"],
        ["--log-level", "loud"],
        ["--port", "-1"],
        ["--image-size", "0"],
    ],
)
def test_bad_options_stop_with_status_2(argv):
    with pytest.raises(SystemExit) as stop:
        parse_settings(argv)
    assert stop.value.code == 2


def test_mismatched_variable_lists_are_refused(monkeypatch):
    monkeypatch.setenv("VIT_MODEL", '["a", "b"]')
    monkeypatch.setenv("VIT_ARCH", "vit_b_16")
    with pytest.raises(ValidationError, match="arch"):
        Settings()


def test_the_forward_threads_follow_the_flag_then_omp_then_the_cpus_shared_by_the_workers(monkeypatch):
    from app.settings import available_cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    assert Settings().forward_threads == cpus
    assert Settings(workers=2 * cpus).forward_threads == 1  # never zero
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert Settings().forward_threads == 3
    assert Settings(threads=5).forward_threads == 5  # the flag wins
    monkeypatch.setenv("VIT_THREADS", "2")
    assert Settings().forward_threads == 2


def test_a_cgroup_cpu_quota_caps_the_available_cpus(tmp_path):
    """A container limited to half a CPU gets one thread, not one per core of the host; 1.5 CPUs round up."""
    from app.settings import available_cpus

    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("50000 100000\n")
    assert available_cpus(cpu_max) == 1
    cpu_max.write_text("150000 100000\n")
    assert available_cpus(cpu_max) == min(affinity, 2)
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == affinity
    assert available_cpus(tmp_path / "absent") == affinity  # no cgroup v2 file: the affinity mask alone


FLAGS = [
    "--model",
    "--arch",
    "--image-size",
    "--models-dir",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--max-batch-size",
    "--max-wait-ms",
    "--max-queue",
    "--request-timeout-s",
    "--max-upload-bytes",
    "--max-images-per-request",
    "--max-image-pixels",
    "--api-key",
    "--log-level",
    "--decode-workers",
    "--decode-pool",
    "--jpeg-draft",
    "--jpeg-decoder",
    "--warmup",
    "--drain-timeout-s",
    "--forward-timeout-s",
    "--compile",
    "--workers",
    "--threads",
    "--lanes",
]


def test_every_setting_is_a_flag_whose_help_is_its_description(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_settings(["--help"])
    assert stop.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for field, info in Settings.model_fields.items():
        flag = "--" + field.replace("_", "-")
        assert info.description and f"{flag} " in usage and " ".join(info.description.split()) in usage, field
    assert [flag for flag in FLAGS if f"{flag} " not in usage] == []  # every flag of today, spelled as always


def test_a_flag_sets_its_field_and_wins_over_its_variable(monkeypatch):
    monkeypatch.setenv("VIT_JPEG_DRAFT", "true")
    monkeypatch.setenv("VIT_DRAIN_TIMEOUT_S", "7")
    s = parse_settings(["--jpeg-draft", "false", "--compile", "off", "--lanes", "3", "--models-dir", "/m"])
    assert (s.jpeg_draft, s.compile, s.lanes, s.models_dir, s.drain_timeout_s) == (False, "off", 3, "/m", 7.0)


def test_the_limits_of_hostile_input_are_flags_with_the_contracts_defaults(monkeypatch):
    s = Settings()
    assert (s.max_decoded_bytes, s.decoded_bytes_limit, s.max_jpeg_scans, s.protect_docs) == (
        None,
        160_000_000,
        100,
        False,
    )
    assert Settings(max_image_pixels=1_000).decoded_bytes_limit == 4_000  # 4 bytes for each allowed pixel
    monkeypatch.setenv("VIT_MAX_JPEG_SCANS", "7")
    s = parse_settings(["--max-decoded-bytes", "5000", "--protect-docs", "true", "--api-key", "k"])
    assert (s.decoded_bytes_limit, s.max_jpeg_scans, s.protect_docs) == (5_000, 7, True)
