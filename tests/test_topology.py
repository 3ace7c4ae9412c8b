import pytest

from flamingo_jax import topology


@pytest.mark.parametrize(
    "name, chips, topo",
    [
        ("v4:8x12x16", 1536, "v4:8x12x16"),
        ("v4-3072", 1536, "v4:8x12x16"),  # gcloud counts v4 TensorCores: 2 per chip
        ("v4-8", 4, "v4:2x2x1"),
        ("v4-32", 16, "v4:2x2x4"),
        ("v4-512", 256, "v4:4x8x8"),
        ("v5p-256", 128, "v5p:4x4x8"),
        ("v5litepod-256", 256, "v5e:16x16"),  # v5e counts chips
        ("v6e-64", 64, "v6e:8x8"),
    ],
)
def test_tpu_names(name, chips, topo):
    t = topology.parse(name)
    assert (t.platform, t.chips, t.topology) == ("tpu", chips, topo)
    assert not t.proxy_for


def test_gpu_cluster_is_a_labelled_proxy_with_the_gpus_memory():
    t = topology.parse("h100:64")
    assert t.topology == "v5p:4x4x4" and t.chips == 64
    assert t.hbm_gib == pytest.approx(79.6)
    assert "proxy" in t.label and "H100" in t.label


def test_bad_names_fail_with_the_accepted_forms():
    with pytest.raises(ValueError, match=r"expected e\.g\."):
        topology.parse("tpu-big")
    with pytest.raises(ValueError, match="3 dimensions"):
        topology.parse("v4:16x16")
    with pytest.raises(ValueError, match="--hbm_gib"):
        topology.parse("cpu:8")
    with pytest.raises(ValueError, match="unknown accelerator"):
        topology.parse("b300:8")


def test_cpu_target_uses_the_fake_devices():
    t = topology.parse("cpu:8", hbm_gib=2)
    assert len(t.devices()) == 8
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
        topology.parse("cpu:16", hbm_gib=2).devices()
