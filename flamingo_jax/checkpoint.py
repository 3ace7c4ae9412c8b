"""Checkpoints: exact resume, preemption, fallback from damaged checkpoints, and initialisation from another run.

`WORKDIR/checkpoints/<step>/` is written by Orbax's (asynchronous) CheckpointManager and holds

    state/  the train state: step, trainable parameters, optimiser state, skip counters (sharded arrays, OCDBT)
    data/   each dataset's Grain iterator state, one JSON file per process (hosts read different shards)
    meta/   JSON: the config, a fingerprint of the frozen weights and a checksum of every array in `state/`

Frozen weights are not saved. They are re-created on every start from `config.seed`, or loaded from the configured
pretrained towers; the fingerprint makes a resume with different frozen weights fail instead of silently training
a different model.

Why checksums: OCDBT notices truncated and garbage files, but a flipped bit inside a compressed chunk restores
with wrong values (measured). The checksums are exact integer sums of the raw bits, computed on device. They do
not depend on the mesh, and any single flipped bit changes them.

A save is atomic: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it once complete, so a process killed
during a save keeps every earlier checkpoint (tests/test_checkpoint.py kills one mid-save).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from flamingo_jax.pretrained import towers

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # where damaged checkpoints are moved, beside CHECKPOINT_DIR
FORMAT = 1
PyTree = Any


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that cannot be read back as written; an earlier one is used instead."""


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint that does not fit this run (different model, optimiser or frozen weights)."""


def validate(cfg: ml_collections.ConfigDict) -> None:
    if cfg.every_steps < 0:
        raise ValueError(f"config.checkpoint.every_steps must be >= 0 (0: only at the end), got {cfg.every_steps}")
    if cfg.keep < 1:
        raise ValueError(f"config.checkpoint.keep must be >= 1, got {cfg.keep}")
    if cfg.keep_every < 0:
        raise ValueError(f"config.checkpoint.keep_every must be >= 0 (0: none), got {cfg.keep_every}")


# ---------------------------------------------------------------------------------------------------------------
# Checksums and fingerprints.
_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two sums of the raw bits weighted by odd position-dependent weights, modulo 2**32.

    Integer addition modulo 2**32 is associative, so the result is exact and the same for any sharding. A flipped
    bit k at position i changes a sum by 2**k * (odd weight), which is never 0 modulo 2**32.
    """
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        utype = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, utype).astype(jnp.uint32)
    # Flat positions from iotas, not a reshape: reshaping a sharded array can move it between devices.
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    return jnp.stack([jnp.sum(u * (idx * jnp.uint32(m) * 2 + 1), dtype=jnp.uint32) for m in _MULTIPLIERS])


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (namedtuples), SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    return "/".join(_key_str(k) for k in path)


def flatten(tree: PyTree, is_leaf: Any = None) -> dict[str, Any]:
    """{'a/b/0/c': leaf}; the same strings for a tree and for Orbax's metadata of it once saved."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {path_str(p): v for p, v in leaves}


def unflatten_like(values: Mapping[str, Any], like: PyTree) -> PyTree:
    """The tree `like` with each leaf replaced by `values[its path]` (the inverse of `flatten`)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: values[path_str(p)], like)


def tree_checksums(tree: PyTree) -> dict[str, str]:
    """{path: 16 hex digits} for every array in `tree` (see _leaf_checksum)."""
    leaves = flatten(tree)
    groups: dict[Any, dict[str, Any]] = {}  # one computation per device set: jit cannot mix them
    for p, x in leaves.items():
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        groups.setdefault(frozenset(d.id for d in x.sharding.device_set), {})[p] = x
    sums = {p: s for group in groups.values() for p, s in jax.device_get(_checksum_tree(group)).items()}
    return {p: f"{int(sums[p][0]):08x}{int(sums[p][1]):08x}" for p in leaves}


def fingerprint(tree: PyTree) -> str:
    """One short digest of every value in `tree`: the same on any mesh, different if any bit differs."""
    return hashlib.sha256(json.dumps(tree_checksums(tree), sort_keys=True).encode()).hexdigest()[:32]


def abstract_like(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------------------------------------------------------
# The Orbax layout: three items per step; JSON documents carry their own hash, so a damaged one is recognised.
def _seal(payload: dict) -> dict:
    return {"payload": payload, "sha256": hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()}


def _unseal(doc: Any, what: str) -> dict:
    if not isinstance(doc, dict) or "payload" not in doc:
        raise DamagedCheckpointError(f"{what}: not a checkpoint document")
    digest = hashlib.sha256(json.dumps(doc["payload"], sort_keys=True).encode()).hexdigest()
    if digest != doc.get("sha256"):
        raise DamagedCheckpointError(f"{what}: content does not match its hash")
    return doc["payload"]


class IteratorStatesHandler(ocp.JsonCheckpointHandler):
    """Every process writes its own `process_<i>-of-<n>.json` (Grain's layout): hosts read different shards."""

    @staticmethod
    def _process_file() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def _save_fn(self, x: Any, directory: epath.Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self._process_file()).write_text(json.dumps(x))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> dict:
        path = directory / self._process_file()
        if not path.exists():
            # Written under another process count: the loaders' states are topology-independent (global batch
            # counts, flamingo_jax.data.global_batches) and adapt on restore, so process 0's is as good as any.
            others = sorted(directory.glob("process_0-of-*.json"))
            if others and others[0].name != f"process_0-of-{jax.process_count()}.json":
                return json.loads(others[0].read_text())
            return {"missing": path.name, "found": sorted(p.name for p in directory.iterdir())}
        return json.loads(path.read_text())


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, meta, data = ocp.PyTreeCheckpointHandler(), ocp.JsonCheckpointHandler(), IteratorStatesHandler()
    reg.add("state", ocp.args.PyTreeSave, state)
    reg.add("state", ocp.args.PyTreeRestore, state)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        reg.add("meta", args, meta)
        reg.add("data", args, data)
    return reg


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    try:
        doc = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise DamagedCheckpointError(f"meta: {type(e).__name__}: {e}") from e
    meta = _unseal(doc, "meta")
    if meta.get("format") != FORMAT:
        raise IncompatibleCheckpointError(f"checkpoint format {meta.get('format')}, this code reads {FORMAT}")
    return meta


def _saved_arrays(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of the saved train state, from Orbax's metadata (nothing large is read)."""
    try:
        tree = manager.item_metadata(step)["state"].tree
    except Exception as e:
        raise DamagedCheckpointError(f"state metadata: {type(e).__name__}: {e}") from e
    leaves = flatten(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return {p: (tuple(m.shape), str(np.dtype(m.dtype))) for p, m in leaves.items() if m is not None}


def _verify(arrays: PyTree, meta: dict, prefix: str = "") -> None:
    """Raises DamagedCheckpointError naming the arrays whose checksum differs from the one saved with them."""
    got = {prefix + p: s for p, s in tree_checksums(arrays).items()}
    bad = sorted(p for p, s in got.items() if meta["checksums"].get(p) != s)
    if bad:
        raise DamagedCheckpointError(f"{len(bad)} arrays differ from their saved checksums: {bad[:5]}")


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process: hosts must agree on which checkpoint they resume from."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _diff_config(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, Mapping):
            return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    a, b = flat(saved), flat(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith("checkpoint."))


# ---------------------------------------------------------------------------------------------------------------
# The run's own checkpoints.
class Checkpoints:
    """Saving and resuming one run (`WORKDIR/checkpoints`).

    The trainer calls `restore(state, iterators)` once (the newest usable checkpoint, if any), then runs its loop
    inside `with ckpt:`, which turns SIGTERM into `preempted(step) == True` at the next step boundary and, on
    leaving, waits for the asynchronous saves. In the loop: `if ckpt.due(step) or ckpt.preempted(step): save(...)`.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, frozen: PyTree):
        cfg = config.checkpoint
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self.every_steps, self.total_steps = int(cfg.every_steps), int(config.train.steps)
        self.config = json.loads(config.to_json_best_effort(sort_keys=True))
        self.frozen_fingerprint = fingerprint(frozen)
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(int(cfg.keep))]
        if cfg.keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(int(cfg.keep_every)))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(cfg.async_save),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # A save cut short by a kill leaves `<step>.orbax-checkpoint-tmp`, never listed as a step; remove it.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())
        self._sigterm = False
        self._previous_handler: Any = None
        self._saved_step: int | None = None

    # -- saving ----------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step == self.total_steps or bool(self.every_steps and step % self.every_steps == 0)

    def save(self, step: int, state: dict, iterators: Mapping[str, Any]) -> None:
        """Starts writing `state` and the iterators' states (returns once the arrays are copied to the host)."""
        if step == self._saved_step:
            return
        meta = dict(
            format=FORMAT,
            step=int(step),
            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            config=self.config,
            frozen_fingerprint=self.frozen_fingerprint,
            checksums=tree_checksums(state),
            process_count=jax.process_count(),
            device_count=jax.device_count(),
        )
        data = _seal({"iterators": {name: _text(it.get_state()) for name, it in iterators.items()}})
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(_seal(meta))
            ),
            force=True,  # the schedule is decided here (due/preempted), not by Orbax's save policy
        )
        self._saved_step = step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    # -- resuming --------------------------------------------------------------------------------------------
    def restore(self, state: dict, iterators: Mapping[str, Any]) -> dict:
        """The train state of the newest usable checkpoint, with the iterators moved to where it was saved.

        Returns `state` itself when there is no checkpoint. Otherwise `state` is donated: its arrays are freed
        before reading, and only their shapes and shardings (the current mesh) are used. A damaged checkpoint is
        moved to `DAMAGED_DIR` with a warning that names it, and the previous one is tried.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return state
        abstract = abstract_like(state)
        jax.tree.map(lambda x: x.delete(), state)
        skipped: list[str] = []
        for step in steps:
            # Only reading errors and checksum mismatches count as damage; anything else is raised, so that a bug
            # or a config mismatch cannot make good checkpoints look damaged.
            try:
                restored, error = self._restore_step(step, abstract, iterators), None
            except IncompatibleCheckpointError as e:
                raise IncompatibleCheckpointError(f"{self.directory / str(step)}: {e}") from e
            except DamagedCheckpointError as e:
                restored, error = None, e
            if not _all_processes(error is None):
                skipped.append(self._set_aside(step, error))
                continue
            logging.info("resumed from %s (step %d)", self.directory / str(step), step)
            if skipped:
                logging.warning("resumed from step %d, after skipping damaged checkpoints: %s", step, skipped)
            return restored
        raise DamagedCheckpointError(
            f"no usable checkpoint in {self.directory}; damaged ones were moved aside: {skipped}. "
            f"Remove {self.directory} to start afresh."
        )

    def _restore_step(self, step: int, abstract: dict, iterators: Mapping[str, Any]) -> dict:
        meta = _read_meta(self.manager, step)
        if meta["frozen_fingerprint"] != self.frozen_fingerprint:
            raise IncompatibleCheckpointError(
                "the frozen weights differ from the ones this checkpoint was trained with (fingerprint "
                f"{self.frozen_fingerprint} != {meta['frozen_fingerprint']}). Frozen weights are not saved: they "
                "are re-created from config.seed or loaded from config.model.lm_pretrained/vision_pretrained, "
                "which must be the same as when the run started."
            )
        want = {p: (tuple(x.shape), str(np.dtype(x.dtype))) for p, x in flatten(abstract).items()}
        saved = _saved_arrays(self.manager, step)
        if saved != want:
            diff = sorted(p for p in set(saved) | set(want) if saved.get(p) != want.get(p))
            raise IncompatibleCheckpointError(
                f"the train state does not match this config at {len(diff)} arrays, e.g. "
                + ", ".join(f"{p}: saved {saved.get(p)}, expected {want.get(p)}" for p in diff[:3])
            )
        changed = _diff_config(meta["config"], self.config)
        if changed:
            logging.warning("config differs from the checkpoint's in: %s", ", ".join(changed[:20]))
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
                    ),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # reading failed: truncated, garbage or missing files
            raise DamagedCheckpointError(f"{type(e).__name__}: {e}") from e
        state = restored["state"]
        _verify(state, meta)
        data = restored["data"]
        if "missing" in data:
            if meta["process_count"] == jax.process_count():
                raise DamagedCheckpointError(f"data/{data['missing']} is missing (found {data['found']})")
            logging.warning(
                "checkpoint written by %d processes, running on %d: the data iterators restart from their "
                "beginning (their states are per process)",
                meta["process_count"],
                jax.process_count(),
            )
        else:
            _set_iterator_states(iterators, _unseal(data, "data")["iterators"])
        self._saved_step = step
        return state

    def _set_aside(self, step: int, error: BaseException | None) -> str:
        src = self.directory / str(step)
        dst = self.directory.parent / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        reason = f"{type(error).__name__}: {error}" if error else "failed on another process"
        logging.warning("checkpoint %s is damaged (%s); moving it to %s and trying the previous one", src, reason, dst)
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"flamingo_set_aside_{step}")
        self.manager.reload()
        return f"step {step} ({reason[:200]}) -> {dst}"

    # -- preemption ------------------------------------------------------------------------------------------
    def preempted(self, step: int) -> bool:
        """True at the first step boundary after SIGTERM, or at the step all hosts agreed on after a preemption
        notice (JAX's preemption service; Orbax asks every host to call this at every step)."""
        return self._sigterm or self.manager.reached_preemption(step)

    def resume_hint(self, step: int) -> str:
        return (
            f"Preempted: saved a checkpoint at step {step} in {self.directory}. To resume, run the same command "
            f"again with --workdir={self.directory.parent}; it continues from step {step}."
        )

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True  # only a flag: the loop saves at the next step boundary

    def __enter__(self) -> Checkpoints:
        # Several processes: JAX's preemption service owns SIGTERM and makes all hosts agree on the step to save
        # at; a handler of our own would replace its one and let hosts stop at different steps.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous_handler = signal.SIG_DFL if previous is None else previous  # None: set outside Python
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        self.manager.wait_until_finished()
        self.manager.close()


def _text(state: bytes | str) -> str:
    return state.decode() if isinstance(state, bytes) else state


def _set_iterator_states(iterators: Mapping[str, Any], states: Mapping[str, str]) -> None:
    for name, it in iterators.items():
        if name in states:
            it.set_state(states[name])
        else:
            logging.warning("dataset %s has no saved iterator state (new in the config?): it starts afresh", name)
    extra = sorted(set(states) - set(iterators))
    if extra:
        logging.warning("saved iterator states of datasets no longer in the config are ignored: %s", extra)


# ---------------------------------------------------------------------------------------------------------------
# Reading another run's checkpoints: fine-tuning (`config.checkpoint.init_from`) and export.
def open_source(path: str) -> tuple[ocp.CheckpointManager, list[int]]:
    """A read-only manager and the steps to try, newest first, for a workdir, its `checkpoints/` or a step dir."""
    p = epath.Path(path)
    if (p / CHECKPOINT_DIR).is_dir():
        root, steps = p / CHECKPOINT_DIR, None
    elif p.name.isdigit() and (p / "meta").is_dir():
        root, steps = p.parent, [int(p.name)]
    else:
        root, steps = p, None
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoints at {path} (expected a workdir, its {CHECKPOINT_DIR}/, or a step)")
    manager = ocp.CheckpointManager(
        root, options=ocp.CheckpointManagerOptions(read_only=True), handler_registry=_registry()
    )
    steps = steps or sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    return manager, steps


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The checkpoint's metadata: config (a dict), frozen_fingerprint, checksums, step, ..."""
    return _read_meta(manager, step)


def read_params(manager: ocp.CheckpointManager, step: int, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
    """{path: array} for the trainable parameters at `targets`' paths ('a/b/c', as in `flatten(params)`), each
    placed with its target's sharding, in the dtype it was saved in, checked against the saved checksums."""
    meta = _read_meta(manager, step)
    saved = {p[len("params/") :]: v for p, v in _saved_arrays(manager, step).items() if p.startswith("params/")}
    missing = sorted(set(targets) - set(saved))
    if missing:
        raise IncompatibleCheckpointError(f"parameters not in the checkpoint: {missing[:5]}")
    tree: dict = {}
    for path, t in targets.items():
        shape, dtype = saved[path]
        if tuple(t.shape) != shape:
            raise IncompatibleCheckpointError(f"params/{path}: saved shape {shape}, expected {tuple(t.shape)}")
        node = tree
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=t.sharding)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": tree},
                    restore_args=ocp.checkpoint_utils.construct_restore_args({"params": tree}),
                    partial_restore=True,
                )
            ),
        )["state"]["params"]
    except Exception as e:
        raise DamagedCheckpointError(f"{type(e).__name__}: {e}") from e
    _verify(restored, meta, prefix="params/")
    return flatten(restored)


def init_from(path: str, state: dict, frozen: PyTree) -> tuple[dict, PyTree]:
    """Fine-tuning: the parameters of another run's newest usable checkpoint (or of the step dir `path`), copied
    into `state['params']` and, for parameters this run freezes, into `frozen`. Step, optimiser state and data
    start afresh. Parameters the checkpoint lacks keep their initial values (with a warning)."""
    manager, steps = open_source(path)
    cur_p = {path_str(p): p for p, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    cur_f = {path_str(p): p for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0]}
    abstract = {**flatten(abstract_like(frozen)), **flatten(abstract_like(state["params"]))}
    for i, step in enumerate(steps):
        try:
            saved = {p[len("params/") :] for p in _saved_arrays(manager, step) if p.startswith("params/")}
            values = read_params(manager, step, {p: abstract[p] for p in saved if p in abstract})
        except IncompatibleCheckpointError as e:
            raise IncompatibleCheckpointError(f"config.checkpoint.init_from={path} (step {step}): {e}") from e
        except DamagedCheckpointError as e:
            if i + 1 == len(steps):
                raise DamagedCheckpointError(f"config.checkpoint.init_from={path}: no usable checkpoint: {e}") from e
            logging.warning(
                "init_from: step %d of %s is unusable (%s: %s); trying the previous", step, path, type(e).__name__, e
            )
            continue
        params, _ = towers.replace_leaves(state["params"], {p: v for p, v in values.items() if p in cur_p})
        frozen, _ = towers.replace_leaves(frozen, {p: v for p, v in values.items() if p in cur_f})
        fresh = sorted(set(cur_p) - set(values))
        logging.info(
            "initialised %d trainable and %d frozen parameters from %s (step %d)",
            len(set(cur_p) & set(values)),
            len(set(cur_f) & set(values)),
            path,
            step,
        )
        if fresh:
            logging.warning(
                "init_from: %d parameters not in the checkpoint keep their initial values: %s", len(fresh), fresh[:10]
            )
        unused = sorted(saved - set(abstract))
        if unused:
            logging.warning(
                "init_from: %d checkpoint parameters have no place in this model: %s", len(unused), unused[:10]
            )
        return dict(state, params=params), frozen
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint picked for reading: its manager, step and metadata."""

    manager: ocp.CheckpointManager
    step: int
    meta: dict


def pick(path: str, step: int | None = None) -> Source:
    """The requested step (or the newest whose metadata reads back) of a workdir, checkpoints dir or step dir."""
    manager, steps = open_source(path)
    if step is not None:
        if step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {path} (have {sorted(manager.all_steps())})")
        steps = [step]
    for s in steps:
        try:
            return Source(manager, s, _read_meta(manager, s))
        except DamagedCheckpointError as e:
            logging.warning("checkpoint step %d of %s is damaged (%s); trying the previous", s, path, e)
    raise DamagedCheckpointError(f"no readable checkpoint under {path}")
