"""The Flamingo trainer.

    python -m flamingo_jax.train --config=configs/demo.py --workdir=/tmp/demo [--config.train.steps=100]

Data flows one way, and the file reads top to bottom in that order:
config -> mesh -> model + state -> input pipeline -> step -> metrics (and checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding

from flamingo_jax import checkpoint, config_flags, distributed, flops, optim, sharding, stage1, train_step
from flamingo_jax import config as config_lib
from flamingo_jax.data import host_rows, synthetic
from flamingo_jax.data import loader as data_loader
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.metrics import MetricWriter, Progress, drop_rows_after, quiet_library_logs
from flamingo_jax.models import contrastive, flamingo
from flamingo_jax.pretrained import towers

_CONFIG = config_flags.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard and checkpoints.")


ModelConfig = flamingo.FlamingoConfig | contrastive.ContrastiveConfig


def is_stage1(config: ml_collections.ConfigDict) -> bool:
    """Stage 1, the contrastive pretraining of the vision encoder (`flamingo_jax.stage1`); else Flamingo."""
    return config.get("stage", "flamingo") == "contrastive"


def create_model(mcfg: ModelConfig, rngs: nnx.Rngs) -> flamingo.Flamingo | contrastive.ContrastiveModel:
    if isinstance(mcfg, contrastive.ContrastiveConfig):
        return contrastive.ContrastiveModel(mcfg, rngs=rngs)
    return flamingo.Flamingo(mcfg, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Config: everything that can be wrong is found here, before devices or data are touched.
def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    mcfg = config_lib.validate(config)
    optim.validate(config.optimizer)
    checkpoint.validate(config.checkpoint)
    t = config.train
    if t.steps <= 0:
        raise ValueError(f"config.train.steps must be positive, got {t.steps}")
    if t.strategy not in train_step.STRATEGIES:
        raise ValueError(f"config.train.strategy: {t.strategy!r}; choose one of {train_step.STRATEGIES}")
    if not config.data.datasets:
        raise ValueError("config.data.datasets is empty")
    for name, ds in config.data.datasets.items():
        where = f"config.data.datasets.{name}"
        if ds.kind not in data_loader.KINDS:
            raise ValueError(f"{where}.kind: {ds.kind!r}; choose one of {data_loader.KINDS}")
        if ds.weight <= 0:
            raise ValueError(f"{where}.weight must be positive, got {ds.weight}")
        if ds.batch_size <= 0 or ds.batch_size % ds.get("micro_batches", 1):
            raise ValueError(
                f"{where}.batch_size={ds.batch_size} must be a positive multiple of "
                f"micro_batches={ds.get('micro_batches', 1)}"
            )
        if is_stage1(config):
            continue
        frames = ds.get("frames", 1)
        if frames > mcfg.resampler.max_frames:
            logging.warning(
                "%s.frames=%d > model.resampler.max_frames=%d: time embeddings are interpolated",
                where,
                frames,
                mcfg.resampler.max_frames,
            )
        seq_len = ds.get("seq_len", data_loader.default_dataset_config(ds.kind).seq_len)
        if seq_len > mcfg.lm.max_len:
            raise ValueError(f"{where}.seq_len={seq_len} exceeds model.lm.max_len={mcfg.lm.max_len}")
    if is_stage1(config):
        stage1.validate(config, mcfg)
    return mcfg


# ---------------------------------------------------------------------------------------------------------------
# Model and state, created directly in their shards.
@dataclasses.dataclass
class Trainer:
    config: ml_collections.ConfigDict
    mcfg: ModelConfig
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    parts: train_step.ModelParts
    tx: Any
    lr: Any
    state_shardings: Any
    frozen_shardings: Any

    @property
    def names(self) -> list[str]:
        return list(self.config.data.datasets)


def _cast_frozen(frozen: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def build(config: ml_collections.ConfigDict, mcfg: ModelConfig, mesh: jax.sharding.Mesh) -> Trainer:
    """Abstract model -> parameter shardings from logical axes -> jitted init with those out_shardings."""
    rules = sharding.rules_from_config(config.sharding.rules)
    abstract = nnx.eval_shape(lambda: create_model(mcfg, nnx.Rngs(config.seed)))
    parts, abstract_params, abstract_frozen = train_step.split_model(abstract)
    var_shardings = sharding.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    trainable_f = flamingo.trainable_filter(mcfg.trainable)
    param_sh = nnx.to_pure_dict(nnx.filter_state(var_shardings, trainable_f))
    frozen_sh = nnx.to_pure_dict(nnx.filter_state(var_shardings, nnx.Not(trainable_f)))
    tx, lr = optim.make(config.optimizer, config.train.steps)
    abstract_state = jax.eval_shape(lambda p: train_step.init_state(p, tx), abstract_params)
    repl = sharding.replicated(mesh)
    opt_sh = optax_shardings(tx, abstract_state["opt_state"], param_sh, repl)
    state_sh = dict(step=repl, params=param_sh, opt_state=opt_sh, skipped=repl, consecutive_skips=repl)
    del abstract_frozen
    return Trainer(config, mcfg, mesh, rules, parts, tx, lr, state_sh, frozen_sh)


def optax_shardings(tx: Any, abstract_opt_state: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Optimiser moments shard like their parameters; counters and other scalars are replicated."""
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings, transform_non_params=lambda _: default
    )


def _random_init(tr: Trainer, skip: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) parameters initialised from `config.seed`, as flat {path: array}, without the subtrees
    `skip` (pretrained towers, loaded instead). Inside `jit`, skipped weights are never computed at all."""
    model = create_model(tr.mcfg, nnx.Rngs(tr.config.seed))
    _, params, frozen = train_step.split_model(model)
    frozen = _cast_frozen(frozen, tr.mcfg.frozen_param_dtype)
    keep = lambda flat: {k: v for k, v in flat.items() if k.split("/")[0] not in skip}
    return keep(checkpoint.flatten(params)), keep(checkpoint.flatten(frozen))


def init_state(tr: Trainer) -> tuple[dict, Any]:
    """(train state, frozen params), each array born on its shards: nothing is materialised whole.

    Pretrained towers are read straight into their shards in their final dtype (`towers.load_towers`); the
    random initialisation skips them, so no tower exists twice, on the host or on the devices.
    """
    if is_stage1(tr.config):
        skip = ("text",) if tr.mcfg.text_pretrained else ()
    else:
        skip = towers.pretrained_towers(tr.mcfg)
    param_sh, frozen_sh = checkpoint.flatten(tr.state_shardings["params"]), checkpoint.flatten(tr.frozen_shardings)
    keep = lambda flat: {k: v for k, v in flat.items() if k.split("/")[0] not in skip}
    with sharding.use_mesh_rules(tr.mesh, tr.rules):
        params, frozen = jax.jit(lambda: _random_init(tr, skip), out_shardings=(keep(param_sh), keep(frozen_sh)))()
    if is_stage1(tr.config):
        pretrained = towers.load_text_tower(tr.mcfg, tr.mesh, tr.rules)
    else:
        pretrained = towers.load_towers(tr.mcfg, tr.mesh, tr.rules)
    params.update({k: v for k, v in pretrained.items() if k in param_sh})
    frozen.update({k: v for k, v in pretrained.items() if k in frozen_sh})
    missing = sorted((set(param_sh) | set(frozen_sh)) - set(params) - set(frozen))
    extra = sorted(set(pretrained) - set(param_sh) - set(frozen_sh))
    if missing or extra:
        raise ValueError(
            f"pretrained towers: parameters not loaded {missing[:5]}; tensors with no parameter {extra[:5]}"
        )
    if pretrained:
        logging.info(
            "loaded %d pretrained tensors (%d trainable, e.g. the added token rows)",
            len(pretrained),
            sum(k in param_sh for k in pretrained),
        )
    params = checkpoint.unflatten_like(params, tr.state_shardings["params"])
    frozen = checkpoint.unflatten_like(frozen, tr.frozen_shardings)
    # The trainable parameters move into the state (donated, not copied); the optimiser state is born sharded.
    make = jax.jit(lambda p: train_step.init_state(p, tr.tx), out_shardings=tr.state_shardings, donate_argnums=0)
    return make(params), frozen


def abstract_state(tr: Trainer) -> tuple[dict, Any]:
    """(train state, frozen params) as sharded ShapeDtypeStructs: what `init_state` returns, with nothing
    allocated or read; for compiling (`jit(...).lower(...)`) and memory planning."""

    def init() -> tuple[dict, Any]:
        params, frozen = _random_init(tr)
        params = checkpoint.unflatten_like(params, tr.state_shardings["params"])
        return train_step.init_state(params, tr.tx), checkpoint.unflatten_like(frozen, tr.frozen_shardings)

    with sharding.use_mesh_rules(tr.mesh, tr.rules):
        state, frozen = jax.eval_shape(init)

    def with_shardings(tree: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    return with_shardings(state, tr.state_shardings), with_shardings(frozen, tr.frozen_shardings)


def check_towers(tr: Trainer) -> None:
    """At start, before any compute: no frozen tower may stay random (unless the config allows it)."""
    if is_stage1(tr.config):
        return  # stage 1 trains its towers from scratch
    frozen = [flamingo.path_str(p) for p, _ in nnx.to_flat_state(tr.parts.frozen)]
    towers.check_random_towers(tr.mcfg, frozen)


# ---------------------------------------------------------------------------------------------------------------
# Input pipeline: one Grain iterator per dataset; host batches become global arrays sharded over `batch`.
def make_tokenizer(config: ml_collections.ConfigDict, mcfg: ModelConfig) -> Tokenizer:
    """The tokenizer, with Flamingo's added tokens placed after the LM's embedding rows, checked against the
    model: one source of truth for `<image>`, `<|endofchunk|>`, pad, BOS and EOS."""
    syn = config.data.synthetic
    if syn.enabled:
        synthetic.prepare_synthetic(
            syn.root,
            seed=syn.seed,
            num_train=syn.num_train,
            num_eval=syn.num_eval,
            image_size=syn.image_size,
            vocab_size=syn.vocab_size,
        )
    if is_stage1(config):
        tok = Tokenizer.from_path(config.data.tokenizer)
        stage1.check_tokenizer(tok, mcfg, config.data.tokenizer)
        return tok
    tok = Tokenizer.from_path(config.data.tokenizer, model_vocab_size=mcfg.lm.vocab_size)
    towers.check_tokenizer(tok, mcfg)
    for name, ds in config.data.datasets.items():
        if ds.get("add_bos") is False and tok.adds_bos:
            logging.warning(
                "config.data.datasets.%s.add_bos=False, but the tokenizer %s prepends BOS (the LM was trained with "
                "it); None follows the tokenizer",
                name,
                config.data.tokenizer,
            )
    return tok


def to_global(
    batch: Mapping[str, np.ndarray], tr: Trainer, global_batch_size: int | None = None
) -> dict[str, jax.Array]:
    """This process's rows of a global batch (`host_rows.batch_rows`, in order) -> global arrays sharded over
    `batch`. `global_batch_size` defaults to the local row count, which only a single process may rely on."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if global_batch_size is None and jax.process_count() > 1:
            raise ValueError("to_global: pass the global batch size when running on several processes")
        global_shape = (v.shape[0] if global_batch_size is None else int(global_batch_size), *v.shape[1:])
        sh = sharding.batch_sharding(tr.mesh, tr.rules, v.ndim, global_shape)
        out[k] = host_rows.global_array(v, sh, global_shape)
    return out


MODEL_KEYS = ("media", "tokens", "targets", "loss_mask", "link_next", "text", "text_mask", "row_mask")


def model_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def abstract_batches(tr: Trainer, *, train: bool = True) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Every dataset's global batch as sharded ShapeDtypeStructs: what the input pipeline feeds the step (the
    evaluation variant with `train=False`), for compiling without data."""
    out = {}
    for name in tr.names:
        ds = data_loader.with_defaults(tr.config.data.datasets[name])
        b, s = int(ds.batch_size), tr.mcfg.vision.image_size
        if is_stage1(tr.config):
            shapes = stage1.batch_shapes(ds, s)
            out[name] = {
                k: jax.ShapeDtypeStruct(sh, dt, sharding=sharding.batch_sharding(tr.mesh, tr.rules, len(sh), sh))
                for k, (sh, dt) in shapes.items()
            }
            continue
        frames = int(ds.frames if train or not ds.eval_frames else ds.eval_frames)
        shapes = dict(
            media=((b, int(ds.max_media), frames, s, s, 3), np.uint8),
            tokens=((b, int(ds.seq_len)), np.int32),
            targets=((b, int(ds.seq_len)), np.int32),
            loss_mask=((b, int(ds.seq_len)), np.float32),
            link_next=((b,), np.bool_),
        )
        out[name] = {
            k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(tr.mesh, tr.rules, len(shape), shape))
            for k, (shape, dt) in shapes.items()
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Steps, compiled with explicit shardings; the state is donated.
def compile_steps(tr: Trainer) -> tuple[dict[str, Any], Any]:
    """{key: jitted train step} (one for `accumulate`/`merged`, one per dataset for `round_robin`), eval step."""
    cfg = tr.config
    weights = {m: float(cfg.data.datasets[m].weight) for m in tr.names}
    micro = {m: int(cfg.data.datasets[m].get("micro_batches", 1)) for m in tr.names}
    objective = cfg.get("stage", "flamingo")
    step = train_step.make_train_step(
        tr.parts, tr.tx, tr.lr, weights, micro, cfg.train.strategy, seed=cfg.seed, objective=objective
    )
    jitted = jax.jit(
        step,
        in_shardings=(tr.state_shardings, tr.frozen_shardings, None),
        out_shardings=(tr.state_shardings, None),
        donate_argnums=(0,),
    )
    keys = tr.names if cfg.train.strategy == "round_robin" else ["all"]
    make_eval = train_step.make_embed_step if is_stage1(cfg) else train_step.make_eval_step
    eval_step = jax.jit(make_eval(tr.parts), in_shardings=(tr.state_shardings["params"], tr.frozen_shardings, None))
    return {k: jitted for k in keys}, eval_step


def step_flops(tr: Trainer, batch_shapes: Mapping[str, Mapping[str, tuple]]) -> float:
    """Model FLOPs of one optimiser step over all datasets, frozen-aware (see flamingo_jax.flops)."""
    return sum(dataset_flops(tr, batch_shapes).values())


def dataset_flops(tr: Trainer, batch_shapes: Mapping[str, Mapping[str, tuple]]) -> dict[str, float]:
    """Model FLOPs of one optimiser step's work on each dataset's batch, frozen-aware: a `round_robin` step
    costs its one dataset's, the others' steps the sum."""
    if is_stage1(tr.config):
        return stage1.dataset_flops(tr, batch_shapes)
    p = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tr.parts.trainable)
    f = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tr.parts.frozen)
    p, f = nnx.to_pure_dict(p), nnx.to_pure_dict(f)
    # A tower trains when any of its weights (beyond the added token rows) is in the trainable tree.
    lm_trains = "layers" in p.get("lm", {})
    vision_trains = "vision" in p
    parts = tr.parts
    if tr.mcfg.attention != "xla":
        # A fused kernel is one opaque call in the jaxpr: count the same attention through its XLA form.
        xla_cfg = dataclasses.replace(tr.mcfg, attention="xla")
        parts, _, _ = train_step.split_model(nnx.eval_shape(lambda: flamingo.Flamingo(xla_cfg, rngs=nnx.Rngs(0))))
    model = parts.merge
    out = {}
    for name, shapes in batch_shapes.items():
        media = jax.ShapeDtypeStruct(shapes["media"], jnp.uint8)
        ids = jax.ShapeDtypeStruct(shapes["tokens"], jnp.int32)
        b, n, t, h, w, _ = shapes["media"]
        frames = jax.ShapeDtypeStruct((b * n * t, h, w, 3), jnp.dtype(tr.mcfg.dtype))
        vision = flops.fn_flops(lambda p, f, x: model(p, f).vision.features(x), p, f, frames)
        encode = flops.fn_flops(lambda p, f, m: model(p, f).encode_media(m), p, f, media)
        lm_only = flops.fn_flops(lambda p, f, i: model(p, f).lm(i)[0], p, f, ids)
        full = flops.fn_flops(lambda p, f, m, i: model(p, f)(m, i), p, f, media, ids)
        resampler, xattn = encode - vision, full - encode - lm_only
        total = (3 if vision_trains else 1) * vision + 3 * (resampler + xattn)
        out[name] = total + (3 if lm_trains else 2) * lm_only
    return out


@dataclasses.dataclass
class Throughput:
    """The work of the steps in one logging window, counting for each step only the datasets it ran (one per
    step under `round_robin`, all of them otherwise): MFU, tokens/s and examples/s over the window."""

    flops: Mapping[str, float]  # one step's model FLOPs per dataset (`dataset_flops`)
    tokens: Mapping[str, int]  # one step's token positions per dataset
    examples: Mapping[str, int]
    steps: int = 0
    window_flops: float = 0.0
    window_tokens: int = 0
    window_examples: int = 0

    @classmethod
    def from_shapes(
        cls, flops_per_dataset: Mapping[str, float], shapes: Mapping[str, Mapping[str, tuple]]
    ) -> Throughput:
        """From `dataset_flops` and the batch shapes it was computed for."""
        text = lambda s: s["tokens"] if "tokens" in s else s["text"]  # stage 2 / stage 1 batches
        tokens = {m: math.prod(text(s)) for m, s in shapes.items()}
        return cls(dict(flops_per_dataset), tokens, {m: text(s)[0] for m, s in shapes.items()})

    def add(self, names: list[str]) -> None:
        """One step, which ran the datasets `names`."""
        self.steps += 1
        self.window_flops += sum(self.flops[m] for m in names)
        self.window_tokens += sum(self.tokens[m] for m in names)
        self.window_examples += sum(self.examples[m] for m in names)

    def metrics(self, elapsed: float, peak_flops: float) -> dict[str, float]:
        """The window's rates over `elapsed` seconds; `peak_flops` is all devices' peak together."""
        return {
            "perf/step_time_s": elapsed / max(self.steps, 1),
            "perf/tokens_per_s": self.window_tokens / elapsed,
            "perf/examples_per_s": self.window_examples / elapsed,
            "perf/mfu": self.window_flops / elapsed / peak_flops,
        }

    def reset(self) -> None:
        self.steps, self.window_flops, self.window_tokens, self.window_examples = 0, 0.0, 0, 0


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: held-out loss, and the same batches with images shuffled across examples.
def evaluate(tr: Trainer, eval_step: Any, state: dict, frozen: Any, tok: Tokenizer) -> dict[str, float]:
    if is_stage1(tr.config):  # zero-shot retrieval and classification
        return stage1.evaluate(tr, eval_step, state, frozen, tok, to_global)
    cfg = tr.config
    iters = data_loader.make_eval_mixture(
        cfg.data,
        tokenizer=tok,
        image_size=tr.mcfg.vision.image_size,
        seed=cfg.seed,
        rows_for=host_rows.rows_for(tr.mesh, tr.rules),
        worker_count=0,
    )
    sums: dict[str, np.ndarray] = {}
    for name, it in iters.items():
        acc = np.zeros(3)
        for i, batch in enumerate(it):
            if i >= cfg.train.eval_batches:
                break
            batch = to_global(model_batch(batch), tr, cfg.data.datasets[name].batch_size)
            out = eval_step(state["params"], frozen, batch)
            acc += np.array([float(out["nll"]), float(out["nll_shuffled"]), float(out["tokens"])])
        sums[name] = acc
    metrics = {}
    for name, (nll, shuf, n) in sums.items():
        metrics[f"eval/loss/{name}"] = nll / max(n, 1)
        metrics[f"eval/loss_shuffled_images/{name}"] = shuf / max(n, 1)
    total = sum(sums.values())
    metrics["eval/loss"] = total[0] / max(total[2], 1)
    metrics["eval/loss_shuffled_images"] = total[1] / max(total[2], 1)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The loop.
def _schedule(names: list[str], strategy: str, step: int) -> list[str]:
    return [names[step % len(names)]] if strategy == "round_robin" else names


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    quiet_library_logs()
    mcfg = validate(config)
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_mesh(config, mcfg, dict(mesh.shape))
    is_main = jax.process_index() == 0
    distributed.log_topology(mesh)
    tr = build(config, mcfg, mesh)
    check_towers(tr)
    tok = make_tokenizer(config, mcfg)
    state, frozen = init_state(tr)

    iters = data_loader.make_mixture(
        config.data,
        tokenizer=tok,
        image_size=mcfg.vision.image_size,
        seed=config.seed,
        rows_for=host_rows.rows_for(tr.mesh, tr.rules),
        stage=config.get("stage", "flamingo"),
    )
    # Checkpoints: continue this workdir's run from its newest usable checkpoint (state and data iterators), or
    # start from another run's parameters (fine-tuning). Frozen weights come from config, never from checkpoints.
    if config.checkpoint.init_from:
        state, frozen = checkpoint.init_from(config.checkpoint.init_from, state, frozen)
    ckpt = checkpoint.Checkpoints(workdir, config, frozen)
    state = ckpt.restore(state, iters)
    start = int(state["step"])
    if start and is_main:
        drop_rows_after(workdir, start)  # the steps after the checkpoint are logged again, identically

    steps, eval_step = compile_steps(tr)
    writer = MetricWriter(workdir, enabled=is_main)
    t = config.train
    progress = Progress(t.steps, start, enabled=is_main)

    peak, peak_src = flops.peak_flops_per_device(t.peak_flops, mcfg.dtype)
    shapes = {
        m: {k: (int(config.data.datasets[m].batch_size), *v.shape[1:]) for k, v in b.items()}
        for m, b in _peek(iters).items()
    }
    per_dataset = dataset_flops(tr, shapes)
    window = Throughput.from_shapes(per_dataset, shapes)
    logging.info(
        "model FLOPs per step per dataset %s; peak %.3e FLOP/s per device (%s)",
        ", ".join(f"{m}={v:.3e}" for m, v in per_dataset.items()),
        peak,
        peak_src,
    )

    last_metrics: dict[str, Any] = {}
    pending = None
    window_start, data_wait = time.perf_counter(), 0.0
    with sharding.use_mesh_rules(mesh, tr.rules), ckpt:  # ckpt: SIGTERM handler; waits for saves on exit
        for step in range(start, t.steps):
            names = _schedule(tr.names, t.strategy, step)
            t0 = time.perf_counter()
            host = {m: next(iters[m]) for m in names}
            data_wait += time.perf_counter() - t0
            batches = {m: to_global(model_batch(b), tr, config.data.datasets[m].batch_size) for m, b in host.items()}
            state, metrics = steps[names[0] if t.strategy == "round_robin" else "all"](state, frozen, batches)
            # Check the previous step's skip counter now that this one is queued: no device idle time.
            if pending is not None and int(pending["train/consecutive_skips"]) >= t.max_consecutive_skips:
                raise FloatingPointError(
                    f"{t.max_consecutive_skips} consecutive steps had a non-finite loss or gradient (last at "
                    f"step {step}); stopping. Lower config.optimizer.lr or check the data."
                )
            pending = metrics
            window.add(names)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    {
                        **window.metrics(elapsed, peak * jax.device_count()),
                        "perf/data_wait_frac": data_wait / elapsed,
                        "data/skipped_examples": sum(it.skipped for it in iters.values()),
                    }
                )
                writer.write(done, metrics)
                last_metrics = metrics
                window.reset()
                window_start, data_wait = time.perf_counter(), 0.0
            if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                jax.block_until_ready(state)  # the window's steps finish inside the window, not inside eval
                t_eval = time.perf_counter()
                ev = evaluate(tr, eval_step, state, frozen, tok)
                writer.write(done, ev)
                progress.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())))
                last_metrics.update(ev)
                window_start += time.perf_counter() - t_eval  # evaluation is not training time
            progress.update(done, last_metrics)
            # Every `every_steps`, at the end, and at the first step boundary after a preemption notice.
            preempted = ckpt.preempted(done)
            if preempted or ckpt.due(done):
                ckpt.save(done, state, iters)
            if preempted:
                logging.warning(ckpt.resume_hint(done))
                break
    progress.close()
    writer.close()
    return {k: float(np.asarray(v)) for k, v in last_metrics.items()}


def _peek(iters: Mapping[str, Iterator]) -> dict[str, dict[str, np.ndarray]]:
    """One batch per dataset, for shapes, without consuming the iterators (their state is restored)."""
    saved = data_loader.get_state(iters)
    out = {m: model_batch(next(it)) for m, it in iters.items()}
    data_loader.set_state(iters, saved)
    return out


def main(argv: list[str]) -> None:
    del argv
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    config = config_flags.get(_CONFIG)
    # Joins the multi-host job (flags or environment, see flamingo_jax.distributed) before any device is touched.
    distributed.initialize(distributed.options_from_flags())
    distributed.run_or_die(lambda: train(config, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
