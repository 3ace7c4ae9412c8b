"""Checkpoints: exact resume after SIGKILL, SIGTERM preemption, another device count, damaged checkpoints,
a kill during a save, retention and fine-tuning initialisation.

The trainer runs in subprocesses (tests/checkpoint_helpers.py: a tiny model, two datasets, a (2, 2, 2) mesh,
6 steps with checkpoints at 3 and 6, every step logged) that share a compilation cache.
"""

import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flamingo_jax import checkpoint, export, sharding
from flamingo_jax import config as config_lib
from tests import checkpoint_helpers as h

N, STEPS = h.EVERY, h.STEPS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return h.shared_reference(tmp_path_factory)


@pytest.fixture
def spawn():
    """h.start, with every process it started killed when the test ends (a failed test leaves none behind)."""
    procs = []

    def start(*args, **kwargs):
        procs.append(h.start(*args, **kwargs))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def train_rows(workdir: str) -> dict[int, dict]:
    """{step: the train/* metrics of its (last) row}."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                rows[row["step"]] = {k: v for k, v in row.items() if k.startswith("train/")}
    return rows


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_bitwise_identical(reference, tmp_path, spawn):
    root, ref, cache = reference
    work = str(tmp_path / "run")
    p = spawn(root, work, log=str(tmp_path / "killed.log"), cache_dir=cache, step_sleep=0.5)
    h.wait_for(lambda: os.path.exists(f"{work}/checkpoints/{N}/commit_success.txt"), 300, p, f"checkpoint {N}")
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert max(h.losses(work)) < STEPS  # killed mid-run
    h.run(root, work, log=str(tmp_path / "resumed.log"), cache_dir=cache)
    assert f"resumed from {work}/checkpoints/{N} (step {N})" in (tmp_path / "resumed.log").read_text()
    want, got = train_rows(ref), train_rows(work)
    assert sorted(got) == list(range(1, STEPS + 1))  # rows after the checkpoint were replaced, not duplicated
    for step in range(N + 1, STEPS + 1):
        assert got[step] == want[step], step  # bitwise: every loss, per-dataset loss and gradient norm


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_resumes_identically(reference, tmp_path, spawn):
    root, ref, cache = reference
    work = str(tmp_path / "run")
    log = tmp_path / "term.log"
    # No periodic checkpoints: the one there is must come from the signal.
    p = spawn(root, work, "--config.checkpoint.every_steps=0", log=str(log), cache_dir=cache, step_sleep=0.5)
    h.wait_for(lambda: os.path.exists(f"{work}/metrics.jsonl") and 2 in h.losses(work), 300, p, "step 2")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    stopped = max(h.losses(work))
    assert stopped < STEPS
    assert os.listdir(f"{work}/checkpoints") == [str(stopped)]
    assert f"Preempted: saved a checkpoint at step {stopped}" in log.read_text()
    assert f"--workdir={work}" in log.read_text()
    h.run(root, work, "--config.checkpoint.every_steps=0", log=str(tmp_path / "resumed.log"), cache_dir=cache)
    want, got = train_rows(ref), train_rows(work)
    for step in range(1, STEPS + 1):
        assert got[step] == want[step], step


@pytest.mark.slow
def test_checkpoint_written_on_8_devices_restores_on_4(reference, tmp_path):
    root, ref, cache = reference
    work = tmp_path / "run"
    shutil.copytree(f"{ref}/checkpoints/{N}", work / "checkpoints" / str(N))  # the (2, 2, 2) run at step N
    log = tmp_path / "four.log"
    h.run(root, str(work), "--config.mesh=(1,4,1)", log=str(log), cache_dir=cache, devices=4)
    text = log.read_text()
    assert "global devices 4" in text and f"resumed from {work}/checkpoints/{N}" in text
    want, got = train_rows(ref), train_rows(str(work))
    assert sorted(got) == list(range(N + 1, STEPS + 1))
    for step in got:  # the same numbers up to float reassociation (a different layout reduces differently)
        np.testing.assert_allclose(got[step]["train/loss"], want[step]["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(got[step]["train/grad_norm"], want[step]["train/grad_norm"], rtol=1e-4)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    root, ref, cache = reference
    work = tmp_path / "run"
    shutil.copytree(ref, work)
    rng = np.random.default_rng(0)
    for f in glob.glob(f"{work}/checkpoints/{STEPS}/state/**/d/*", recursive=True):  # garbage data files
        os.chmod(f, 0o644)
        with open(f, "r+b") as fh:
            fh.write(rng.bytes(os.path.getsize(f)))
    log = tmp_path / "resumed.log"
    h.run(root, str(work), log=str(log), cache_dir=cache)
    text = log.read_text()
    assert f"checkpoint {work}/checkpoints/{STEPS} is damaged" in text
    assert f"resumed from step {N}, after skipping damaged checkpoints: ['step {STEPS}" in text
    assert [d.split("-")[0] for d in os.listdir(work / "damaged_checkpoints")] == [str(STEPS)]
    want, got = train_rows(ref), train_rows(str(work))
    for step in range(N + 1, STEPS + 1):  # steps N+1..2N trained again from step N, identically
        assert got[step] == want[step], step
    assert sorted(int(s) for s in os.listdir(work / "checkpoints")) == [N, STEPS]  # and saved again


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint module on small trees (in this process).
def weights(seed: int) -> jax.Array:
    # 256 KiB of noise on one device: one chunk, the checkpoint's largest file, about as large compressed.
    return jax.random.normal(jax.random.key(seed), (128, 512))


def small_state(seed: int) -> dict:
    return {"step": jnp.int32(seed), "params": {"w": weights(seed), "b": jnp.full(3, seed)}}


def save_steps(workdir, steps, **cfg) -> None:
    with checkpoint.Checkpoints(str(workdir), h.small_config(**cfg), frozen={}) as ckpt:
        for s in steps:
            ckpt.save(s, small_state(s), {"d": h.FakeIterator(s)})


def restore(workdir, **cfg) -> tuple[dict, int]:
    it = {"d": h.FakeIterator()}
    state = checkpoint.Checkpoints(str(workdir), h.small_config(**cfg), frozen={}).restore(small_state(0), it)
    return state, it["d"].position


def test_flipped_bit_that_orbax_restores_silently_is_caught_by_checksums(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    # Flip a bit in the middle of the largest data file: inside the compressed chunk of params/w.
    data_file = max(glob.glob(f"{tmp_path}/checkpoints/2/state/**/d/*", recursive=True), key=os.path.getsize)
    assert os.path.getsize(data_file) > 200_000
    raw = bytearray(pathlib.Path(data_file).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    pathlib.Path(data_file).write_bytes(bytes(raw))
    state, position = restore(tmp_path)
    assert int(state["step"]) == 1 and position == 1
    np.testing.assert_array_equal(state["params"]["w"], weights(1))
    assert "differ from their saved checksums: ['params/w']" in caplog.text
    assert os.listdir(tmp_path / "damaged_checkpoints")[0].startswith("2-")


@pytest.mark.parametrize("damage", ["missing_data", "missing_state_metadata", "garbage_meta"])
def test_missing_or_garbage_files_fall_back(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2])
    d = tmp_path / "checkpoints" / "2"
    if damage == "missing_data":
        os.remove(d / "data" / "process_0-of-1.json")
    elif damage == "missing_state_metadata":
        os.remove(d / "state" / "_METADATA")
    else:
        (d / "meta" / "metadata").write_text('{"payload": {"format": 1}, "sha256": "0"}')
    state, position = restore(tmp_path)
    assert int(state["step"]) == 1 and position == 1
    assert f"checkpoint {d} is damaged" in caplog.text


def test_different_frozen_weights_fail_clearly_and_move_nothing(tmp_path):
    save_steps(tmp_path, [1])
    ckpt = checkpoint.Checkpoints(str(tmp_path), h.small_config(), frozen={"lm": jnp.ones(3)})
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="frozen weights differ"):
        ckpt.restore(small_state(0), {"d": h.FakeIterator()})
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_keeps_the_newest_and_every_kth(tmp_path):
    save_steps(tmp_path, range(1, 11), keep=2, keep_every=4, async_save=False)  # (synchronous saves work too)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [4, 8, 9, 10]


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import jax, jax.numpy as jnp
        sys.path.insert(0, {h.REPO!r})
        from flamingo_jax import checkpoint
        from tests import checkpoint_helpers as h
        ckpt = checkpoint.Checkpoints({str(tmp_path)!r}, h.small_config(), frozen={{}})
        small = {{"w": jnp.ones((4,))}}
        ckpt.save(1, small, {{"d": h.FakeIterator(1)}})
        ckpt.wait()
        big = {{"w": jax.random.normal(jax.random.key(0), (50_000_000,))}}  # shapes only matter for the test
        print("saving 2", flush=True)
        ckpt.save(2, big, {{"d": h.FakeIterator(2)}})
        ckpt.wait()
        print("saved 2", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], env=h.env(devices=1), stdout=subprocess.PIPE, text=True)
    ckpts = tmp_path / "checkpoints"
    try:
        assert p.stdout.readline().strip() == "saving 2"
        h.wait_for(lambda: any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts)), 60, p, "the step-2 save")
    finally:
        p.kill()
        p.wait()
    assert "2" not in os.listdir(ckpts), "the save finished before the kill: make the array bigger"
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in os.listdir(ckpts))
    it = {"d": h.FakeIterator()}
    ckpt = checkpoint.Checkpoints(str(tmp_path), h.small_config(), frozen={})
    state = ckpt.restore({"w": jnp.zeros((4,))}, it)
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert it["d"].position == 1
    h.wait_for(lambda: os.listdir(ckpts) == ["1"], 30, what="the partial save to be cleaned up")


@pytest.mark.slow
def test_init_from_copies_parameters_only(reference):
    _, ref, _ = reference
    src = checkpoint.pick(ref)
    config = ml_collections.ConfigDict(src.meta["config"])
    mcfg = config_lib.model_config(config)
    mesh, rules = export._mesh(), sharding.rules_from_config(config.sharding.rules)
    lay = export.layout(mcfg, config.seed, mesh, rules)
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), t)
    state = {"step": jnp.int32(0), "params": zeros(lay.params), "opt_state": (jnp.zeros(2),)}
    frozen = zeros(lay.frozen)
    want = checkpoint.read_params(src.manager, STEPS, checkpoint.flatten(lay.params))
    for path in (ref, f"{ref}/checkpoints/{N}"):  # a workdir (its newest step), or one step dir
        new_state, new_frozen = checkpoint.init_from(path, state, frozen)
        got = checkpoint.flatten(new_state["params"])
        if path == ref:
            assert all(np.array_equal(got[k], want[k]) for k in want)
        assert not all(np.array_equal(got[k], 0) for k in got)
        assert int(new_state["step"]) == 0 and new_state["opt_state"] is state["opt_state"]
        assert all(not np.any(x) for x in jax.tree.leaves(new_frozen))  # this run freezes what that one froze
