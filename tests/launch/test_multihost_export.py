"""The issue's acceptance test for sharded export: a model exported by 2 processes x 4 CPU devices (each process
writing the slices its own devices hold, no gather) loads on 1 x 8 devices and on one device, with the
parameters bit for bit those of the checkpoint and the logits of the trained model.

The training run is the 2 x 4 run of tests/launch/test_multihost_train.py (the same command, 4 steps of the tiny
config on one dataset), made once per test session (helpers.shared_two_by_four). The export and the training run
without the persistent compilation cache: multi-process CPU runs must not share one (see test_multihost_train.py).
"""

import json
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import flamingo_jax
from flamingo_jax import export
from flamingo_jax.data.tokenizer import Tokenizer
from tests.launch import helpers
from tests.test_export import assert_same_params, from_checkpoint, sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory):
    return helpers.shared_two_by_four(tmp_path_factory) / "workdir"


@pytest.fixture(scope="module")
def exported_by_two_processes(two_by_four, tmp_path_factory):
    """`python -m flamingo_jax.export --full` as 2 processes x 4 devices on mesh (1, 2, 4): parameters split over
    `fsdp` and `tensor`, both inside and across processes."""
    out = tmp_path_factory.mktemp("export") / "model"
    log = helpers.launch_local(
        2,
        4,
        "flamingo_jax.export",
        [f"--workdir={two_by_four}", f"--out={out}", "--full", "--mesh=1,2,4", "--distributed_heartbeat_timeout=30"],
    )
    return out, log


def test_two_processes_write_their_own_shards_and_one_index(exported_by_two_processes):
    out, log = exported_by_two_processes
    wrote = {int(p): (int(k), int(n)) for p, k, n in re.findall(r"process (\d) wrote (\d+) of (\d+) files", log)}
    assert set(wrote) == {0, 1} and all(k > 0 for k, _ in wrote.values()), log[-4000:]
    assert sum(k for k, _ in wrote.values()) == wrote[0][1]
    index = json.loads((out / export.INDEX_FILE).read_text())
    assert index["metadata"]["processes"] == 2 and index["metadata"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert any(len(p["slices"]) == 8 for p in index["parameters"].values())  # split over fsdp x tensor
    assert "[local] exit 0" in log


@pytest.fixture(scope="module")
def trained(two_by_four, exported_by_two_processes):
    """The checkpointed model on one device (its frozen towers re-created), a forward function, a sample batch
    and the model's logits on it."""
    direct = from_checkpoint(str(two_by_four))
    graphdef, _ = nnx.split(direct)
    forward = jax.jit(lambda state, media, ids: nnx.merge(graphdef, state)(media, ids))
    tok = Tokenizer.from_path(str(exported_by_two_processes[0] / "tokenizer.model"))
    media, ids = sample(tok, direct.cfg.vision.image_size)
    want = np.asarray(forward(nnx.state(direct), media, ids))
    assert np.isfinite(want).all() and want.std() > 0
    return direct, forward, media, ids, want


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 1, 1)])
def test_export_of_two_processes_loads_on_1x8_and_1x1_with_the_trained_logits(exported_by_two_processes, trained, mesh):
    direct, forward, media, ids, want = trained
    ex = flamingo_jax.load_exported(str(exported_by_two_processes[0]), mesh=export._mesh(mesh))
    state = nnx.state(ex.model)
    axes = dict(zip(("data", "fsdp", "tensor"), mesh))
    assert all(dict(x.sharding.mesh.shape) == axes for x in jax.tree.leaves(state))
    assert_same_params(ex.model, direct)
    got = np.asarray(forward(state, media, ids))
    if mesh == (1, 1, 1):
        np.testing.assert_array_equal(got, want)
    else:  # computed sharded: the same to float rounding; the same parameters on one device: exactly
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(forward(jax.device_put(state, jax.devices()[0]), media, ids)), want)
    print(f"mesh {mesh}: logits match the checkpoint's (max |diff| {np.abs(got - want).max():.2e})", file=sys.stderr)
