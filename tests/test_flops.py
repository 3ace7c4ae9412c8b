import jax
import jax.numpy as jnp

from flamingo_jax import flops


def _s(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_matmul_conv_and_scan_flops():
    assert flops.fn_flops(lambda a, b: a @ b, _s(4, 8), _s(8, 16)) == 2 * 4 * 8 * 16
    # Batched einsum: every batch element counts.
    assert flops.fn_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), _s(3, 4, 8), _s(3, 8, 5)) == 2 * 3 * 4 * 8 * 5

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=2)

    # out [1, 4, 4, 6]; each output element is a 3x3x(4/2) dot product.
    assert flops.fn_flops(conv, _s(1, 8, 8, 4), _s(3, 3, 2, 6)) == 2 * (4 * 4 * 6) * (3 * 3 * 2)
    scanned = lambda c, ws: jax.lax.scan(lambda h, w: (h @ w, None), c, ws)[0]
    assert flops.fn_flops(scanned, _s(2, 8), _s(5, 8, 8)) == 5 * 2 * 2 * 8 * 8
    # Under jit and remat the count is the same.
    assert flops.fn_flops(jax.jit(jax.checkpoint(lambda a, b: a @ b)), _s(4, 8), _s(8, 16)) == 2 * 4 * 8 * 16


def test_configured_peak_wins_and_cpu_peak_is_measured():
    assert flops.peak_flops_per_device(1e12, "float32") == (1e12, "config.train.peak_flops")
    peak, source = flops.peak_flops_per_device(0.0, "float32")
    assert source.startswith("measured") and 1e9 < peak < 1e14


def test_step_flops_do_not_depend_on_the_attention_kernel():
    # A fused kernel (cuDNN) is one opaque call in the jaxpr; MFU must count the same attention FLOPs for it.
    from flamingo_jax import sharding, train
    from tests.configs import tiny_train_config

    counts = {}
    for impl in ("xla", "cudnn"):
        c = tiny_train_config()
        c.model.attention = impl
        tr = train.build(c, train.validate(c), sharding.make_mesh((-1, 1, 1)))
        shapes = {}
        for name, ds in c.data.datasets.items():
            b, s = ds.batch_size, c.model.vision.image_size
            shapes[name] = dict(media=(b, ds.max_media, ds.frames, s, s, 3), tokens=(b, ds.seq_len))
        counts[impl] = train.step_flops(tr, shapes)
    assert counts["xla"] > 0 and counts["cudnn"] == counts["xla"]


def test_matmul_peak_is_measured_for_the_compute_dtype():
    peak = flops.measure_matmul_peak("float32", n=256, seconds=0.2)
    assert 1e8 < peak < 1e15
