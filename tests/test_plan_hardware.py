"""Hardware profiles: strict YAML (one-line errors naming the key), round trip, every shipped profile loads."""

from pathlib import Path

import pytest

from fuyou.errors import ConfigError
from fuyou.plan import HardwareProfile

ROOT = Path(__file__).parent.parent
PROFILES = sorted((ROOT / "configs" / "hardware").glob("*.yaml"))

FIELDS = dict(
    name="t", compute_device="cuda", gpu_tflops=100.0, gpu_fp8_tflops=0.0, gpu_memory_gb=24.0, h2d_gbps=25.0,
    d2h_gbps=25.0, cpu_memory_gb=256.0, cpu_adam_gparams_per_s=2.0, ssd_read_gbps=6.5, ssd_write_gbps=3.4,
    ssd_count=2, source="test",
)


def test_shipped_profiles_exist():
    assert {p.name for p in PROFILES} >= {"rtx4090-12ssd.yaml", "h100-box.yaml"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_loads_and_names_its_command(path):
    profile = HardwareProfile.from_yaml(path)
    assert path.read_text().startswith("# fuyou plan ")
    assert profile.gpu_tflops > 0 and profile.source


def test_testbed_profile_is_the_fuyou_machine():
    profile = HardwareProfile.from_yaml(ROOT / "configs" / "hardware" / "rtx4090-12ssd.yaml")
    assert profile.ssd_count == 12 and profile.gpu_memory_gb == pytest.approx(24, abs=0.1)
    assert profile.ssd_array_read_gbps == pytest.approx(12 * 6.5) and profile.ssd_array_write_gbps == pytest.approx(12 * 3.4)


def write(tmp_path, fields, extra=""):
    path = tmp_path / "hw.yaml"
    path.write_text("".join(f"{k}: {v!r}\n" if isinstance(v, str) else f"{k}: {v}\n" for k, v in fields.items()) + extra)
    return path


def test_round_trip(tmp_path):
    profile = HardwareProfile(**FIELDS, pcie_duplex_gbps=40.0)
    profile.to_yaml(tmp_path / "out.yaml", header="made by a test\nsecond line")
    assert (tmp_path / "out.yaml").read_text().startswith("# made by a test\n# second line\n")
    assert HardwareProfile.from_yaml(tmp_path / "out.yaml") == profile


def test_integers_are_accepted_where_floats_are_expected(tmp_path):
    profile = HardwareProfile.from_yaml(write(tmp_path, FIELDS | {"gpu_tflops": 165}))
    assert profile.gpu_tflops == 165.0 and isinstance(profile.gpu_tflops, float)


@pytest.mark.parametrize(
    "change, extra, message",
    [
        ({}, "gpu_tflop: 3\n", "unknown key 'hardware.gpu_tflop'; did you mean 'hardware.gpu_tflops'?"),
        ({"h2d_gbps": "fast"}, "", "'hardware.h2d_gbps' expects float"),
        ({"ssd_count": 1.5}, "", "'hardware.ssd_count' expects int"),
        ({"gpu_memory_gb": -1}, "", "hardware.gpu_memory_gb must be > 0"),
        ({"compute_device": "tpu"}, "", "hardware.compute_device must be one of cuda, cpu"),
    ],
)
def test_mistakes_are_one_line_errors_naming_the_key(tmp_path, change, extra, message):
    with pytest.raises(ConfigError) as error:
        HardwareProfile.from_yaml(write(tmp_path, FIELDS | change, extra))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_keys_and_files(tmp_path):
    fields = dict(FIELDS)
    del fields["ssd_count"]
    with pytest.raises(ConfigError, match="missing key.*hardware.ssd_count"):
        HardwareProfile.from_yaml(write(tmp_path, fields))
    with pytest.raises(ConfigError, match="not found; write one with `fuyou probe"):
        HardwareProfile.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("gpu_tflops: [1\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        HardwareProfile.from_yaml(tmp_path / "bad.yaml")


def test_no_ssd_allows_zero_rates():
    profile = HardwareProfile(**FIELDS | {"ssd_count": 0, "ssd_read_gbps": 0.0, "ssd_write_gbps": 0.0})
    assert profile.ssd_array_read_gbps == 0
    with pytest.raises(ConfigError, match="ssd_read_gbps must be > 0"):
        HardwareProfile(**FIELDS | {"ssd_read_gbps": 0.0})
