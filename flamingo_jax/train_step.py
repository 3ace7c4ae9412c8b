"""One optimiser step over the dataset mixture.

The objective is the paper's `sum_m lambda_m * E_{D_m}[-log p(y | x)]` with a per-token mean inside each dataset.
Three strategies (the paper's ablation, section 3.3 / table 3):

- `accumulate` (the paper's choice): the gradient of each dataset's loss on its own batch, weighted by lambda_m,
  summed, then one update. Each dataset's batch is split into `micro_batches` scanned slices; every slice's loss
  is divided by the token count of the whole dataset batch, so the sum is exactly the full-batch gradient for
  any number of micro-batches.
- `round_robin`: one dataset per step, in turn, its gradient weighted by lambda_m.
- `merged`: one pooled token mean over all datasets' examples, lambda_m weighting each dataset's tokens.

The objective is chosen by `config.stage` (`OBJECTIVES`): Flamingo's token NLL (stage 2), or stage 1's contrastive
loss (`models.contrastive`), whose per-pair terms are summed exactly like token NLL terms, with pairs in place of
tokens. A contrastive loss does not decompose over micro-batches (every pair is every other pair's negative), so
that stage refuses `micro_batches > 1`; and under `merged` its datasets form one batch, negatives across datasets,
each pair weighted by its dataset's lambda_m.

Only trainable parameters are differentiated: the frozen towers enter as constants, so autodiff computes the
activation gradients it needs through the frozen LM and no weight gradients at all.

Randomness (an NFNet vision encoder's stochastic depth, used only when the encoder trains) comes from a key
derived from the seed and `state["step"]`, then per dataset (by name) and per micro-batch (by index): it depends
on nothing else, so a resumed run and a sharded one draw exactly what an uninterrupted single-device run draws.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import contrastive, flamingo

Array = jax.Array
Batch = dict[str, Array]
PyTree = Any

STRATEGIES = ("accumulate", "round_robin", "merged")


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The static half of a Flamingo split into trainable and frozen parameters (plain nested dicts)."""

    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State

    def merge(self, params: PyTree, frozen: PyTree) -> flamingo.Flamingo:
        t = jax.tree.map(lambda x: x, self.trainable)
        f = jax.tree.map(lambda x: x, self.frozen)
        nnx.replace_by_pure_dict(t, params)
        nnx.replace_by_pure_dict(f, frozen)
        return nnx.merge(self.graphdef, t, f)


def split_model(model: flamingo.Flamingo) -> tuple[ModelParts, PyTree, PyTree]:
    """(parts, trainable params, frozen params) by the model's `trainable` patterns."""
    patterns = model.cfg.trainable
    flamingo.check_trainable_patterns(model, patterns)
    graphdef, trainable, frozen, rest = nnx.split(model, flamingo.trainable_filter(patterns), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model has non-parameter state the trainer does not handle: {rest}")
    parts = ModelParts(graphdef, nnx.eval_shape(lambda: trainable), nnx.eval_shape(lambda: frozen))
    return parts, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def token_nll(logits: Array, targets: Array, mask: Array) -> Array:
    """Sum over tokens of -log p(target), masked. logits float32 [B, L, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask)


def batch_nll(parts: ModelParts, params: PyTree, frozen: PyTree, batch: Batch, rng: Array | None = None) -> Array:
    """Sum of token NLL; `rng` (training only) switches on the vision encoder's stochastic depth if it trains."""
    model = parts.merge(params, frozen)
    logits = model(batch["media"], batch["tokens"], link_next=batch.get("link_next"), rng=rng)
    return token_nll(logits, batch["targets"], batch["loss_mask"])


def batch_contrastive(
    parts: ModelParts, params: PyTree, frozen: PyTree, batch: Batch, rng: Array | None = None
) -> Array:
    """Sum over the batch's pairs of the two-way InfoNCE loss, each pair weighted by `row_weight` (default
    `row_mask`); pairs with weight 0 are not negatives either."""
    model = parts.merge(params, frozen)
    images = batch["media"][:, 0, 0]  # pairs: one image of one frame
    img, txt, scale = model(images, batch["text"], batch["text_mask"], rng=rng)
    per_pair = contrastive.contrastive_loss(img, txt, scale, batch["row_mask"])
    return jnp.sum(per_pair * batch.get("row_weight", batch["row_mask"]))


@dataclasses.dataclass(frozen=True)
class Objective:
    """A stage's loss as a sum over units (tokens or pairs), and how many units a batch holds."""

    loss_sum: Callable[..., Array]  # (parts, params, frozen, batch, rng) -> sum over units
    units: Callable[[Batch], Array]  # batch -> number of units (the per-dataset mean's denominator)
    decomposes: bool  # whether the sum over micro-batches equals the sum over the batch


OBJECTIVES = {
    "flamingo": Objective(batch_nll, lambda b: jnp.sum(b["loss_mask"]), decomposes=True),
    "contrastive": Objective(batch_contrastive, lambda b: jnp.sum(b["row_mask"]), decomposes=False),
}


def split_micro(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], micro-batch j holding rows j, j+n, j+2n, ...

    Strided rather than contiguous: the batch is sharded in contiguous blocks over devices, so a contiguous
    micro-batch would live on a fraction of the devices; a strided one has an equal share on every device.
    """

    def f(x: Array) -> Array:
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} is not divisible into {n} micro-batches")
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(f, batch)


def dataset_grad(
    parts: ModelParts,
    params: PyTree,
    frozen: PyTree,
    batch: Batch,
    micro_batches: int,
    weight: Array,
    denom: Array,
    rng: Array | None = None,
    loss_sum: Callable[..., Array] = batch_nll,
) -> tuple[Array, PyTree]:
    """(loss sum, gradient of weight * loss sum / denom) over one dataset's batch, micro-batches scanned.
    Micro-batch j draws from `fold_in(rng, j)`. `loss_sum`: the objective's (token NLL by default)."""
    grad_fn = jax.value_and_grad(lambda p, b, k: weight * loss_sum(parts, p, frozen, b, k) / denom)

    def micro(carry: tuple[Array, PyTree], xs: tuple[Batch, Array]) -> tuple[tuple[Array, PyTree], None]:
        total, grads = carry
        mb, j = xs
        value, g = grad_fn(params, mb, None if rng is None else jax.random.fold_in(rng, j))
        return (total + value, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (split_micro(batch, micro_batches), jnp.arange(micro_batches, dtype=jnp.uint32))
    (total, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), xs)
    # `total` is weight * NLL / denom; return the raw NLL sum for reporting.
    return total * denom / weight, grads


def step_key(seed: int, step: Array) -> Array:
    """The training step's key: a function of the seed and the step number only."""
    return jax.random.fold_in(jax.random.key(seed), step)


def dataset_key(key: Array, name: str) -> Array:
    """A dataset's key within a step, by name: the same whichever datasets the step runs (`round_robin`)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def init_state(params: PyTree, tx: optax.GradientTransformation) -> dict[str, Any]:
    return dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        skipped=jnp.zeros((), jnp.int32),
        consecutive_skips=jnp.zeros((), jnp.int32),
    )


def mixture_grads(
    parts: ModelParts,
    params: PyTree,
    frozen: PyTree,
    batches: Mapping[str, Batch],
    weights: Mapping[str, float],
    micro_batches: Mapping[str, int],
    strategy: str = "accumulate",
    rng: Array | None = None,
    objective: str = "flamingo",
) -> tuple[PyTree, dict[str, Array]]:
    """The gradient of the mixture objective over `batches` (all datasets, or this step's one for
    `round_robin`), and its loss metrics. `rng`: the step's key (`step_key`), None for a deterministic pass."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy: {strategy!r}; choose one of {STRATEGIES}")
    obj = OBJECTIVES[objective]
    if not obj.decomposes and any(micro_batches[m] > 1 for m in batches):
        raise ValueError(f"the {objective} objective does not split into micro-batches; set micro_batches=1")
    if objective == "contrastive" and strategy == "merged":
        return _merged_contrastive(parts, params, frozen, batches, weights, rng)
    tokens = {m: obj.units(b) for m, b in batches.items()}
    if strategy == "merged":
        pooled = jnp.maximum(sum(weights[m] * tokens[m] for m in batches), 1.0)
        denoms = {m: pooled for m in batches}
    else:
        denoms = {m: jnp.maximum(tokens[m], 1.0) for m in batches}
    grads = jax.tree.map(jnp.zeros_like, params)
    metrics: dict[str, Array] = {}
    objective = jnp.zeros((), jnp.float32)
    for m, batch in batches.items():  # static: one traced block per dataset
        key = None if rng is None else dataset_key(rng, m)
        nll, g = dataset_grad(
            parts, params, frozen, batch, micro_batches[m], jnp.float32(weights[m]), denoms[m], key, obj.loss_sum
        )
        grads = jax.tree.map(jnp.add, grads, g)
        metrics[f"train/loss/{m}"] = nll / jnp.maximum(tokens[m], 1.0)
        objective = objective + weights[m] * nll / denoms[m]
    metrics["train/loss"] = objective
    metrics["train/tokens" if obj.decomposes else "train/pairs"] = sum(tokens.values())
    return grads, metrics


def _merged_contrastive(
    parts: ModelParts,
    params: PyTree,
    frozen: PyTree,
    batches: Mapping[str, Batch],
    weights: Mapping[str, float],
    rng: Array | None,
) -> tuple[PyTree, dict[str, Array]]:
    """`merged` for the contrastive stage: all datasets' pairs as one batch (negatives across datasets), the
    loss a mean over pairs in which each pair counts lambda_m of its dataset."""
    names = list(batches)
    keys = ("media", "text", "text_mask", "row_mask")
    merged = {k: jnp.concatenate([batches[m][k] for m in names]) for k in keys}
    merged["row_weight"] = jnp.concatenate([batches[m]["row_mask"] * weights[m] for m in names])
    merged = {k: sharding.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in merged.items()}
    denom = jnp.maximum(jnp.sum(merged["row_weight"]), 1e-9)
    key = None if rng is None else dataset_key(rng, "merged")

    def loss(p: PyTree) -> tuple[Array, Array]:
        model = parts.merge(p, frozen)
        img, txt, scale = model(merged["media"][:, 0, 0], merged["text"], merged["text_mask"], rng=key)
        per_pair = contrastive.contrastive_loss(img, txt, scale, merged["row_mask"])
        return jnp.sum(per_pair * merged["row_weight"]) / denom, per_pair

    (value, per_pair), grads = jax.value_and_grad(loss, has_aux=True)(params)
    metrics: dict[str, Array] = {"train/loss": value}
    start = 0
    for m in names:
        n = batches[m]["row_mask"].shape[0]
        mask = merged["row_mask"][start : start + n]
        metrics[f"train/loss/{m}"] = jnp.sum(per_pair[start : start + n]) / jnp.maximum(jnp.sum(mask), 1.0)
        start += n
    metrics["train/pairs"] = jnp.sum(merged["row_mask"])
    return grads, metrics


def apply_update(
    state: dict,
    grads: PyTree,
    loss: Array,
    tx: optax.GradientTransformation,
) -> tuple[dict, dict[str, Array]]:
    """One optimiser update; a non-finite loss or gradient leaves parameters and optimiser state untouched."""
    params = state["params"]
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = dict(
        step=state["step"] + 1,
        params=keep(new_params, params),
        opt_state=keep(new_opt, state["opt_state"]),
        skipped=state["skipped"] + (~finite).astype(jnp.int32),
        consecutive_skips=jnp.where(finite, 0, state["consecutive_skips"] + 1),
    )
    return new_state, {
        "train/grad_norm": grad_norm,
        "train/skipped_updates": new_state["skipped"],
        "train/consecutive_skips": new_state["consecutive_skips"],
    }


def update_count(state: dict) -> Array:
    """How many updates the optimiser has applied: the schedule's count in its state (optax's
    `scale_by_schedule`, as in `optim.make`; any other counter of the chain otherwise). A skipped update keeps the
    old optimiser state, so this lags `state["step"]` by the skips; `step - skipped` if the chain counts nothing."""
    opt_state = state["opt_state"]
    count = optax.tree_utils.tree_get(
        opt_state, "count", filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"
    )
    if count is None:
        counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        count = counts[0][1] if counts else state["step"] - state["skipped"]
    return count


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    weights: Mapping[str, float],
    micro_batches: Mapping[str, int],
    strategy: str = "accumulate",
    seed: int = 0,
    objective: str = "flamingo",
) -> Callable[[dict, PyTree, Mapping[str, Batch]], tuple[dict, dict[str, Array]]]:
    """`step(state, frozen, batches) -> (state, metrics)`.

    `train/lr` is the learning rate of this step's update: the schedule at the optimiser's own count, which a
    skipped update does not advance (`update_count`). On a skipped step it is the rate the discarded update would
    have applied, and the next step applies it. `seed` and `state["step"]` give the step's key (`step_key`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy: {strategy!r}; choose one of {STRATEGIES}")
    if objective not in OBJECTIVES:
        raise ValueError(f"stage: {objective!r}; choose one of {sorted(OBJECTIVES)}")

    def step(state: dict, frozen: PyTree, batches: Mapping[str, Batch]) -> tuple[dict, dict[str, Array]]:
        rng = step_key(seed, state["step"])
        grads, metrics = mixture_grads(
            parts, state["params"], frozen, batches, weights, micro_batches, strategy, rng, objective
        )
        lr = lr_schedule(update_count(state))
        new_state, update_metrics = apply_update(state, grads, metrics["train/loss"], tx)
        return new_state, {**metrics, **update_metrics, "train/lr": lr}

    return step


def make_eval_step(parts: ModelParts) -> Callable[[PyTree, PyTree, Batch], dict[str, Array]]:
    """NLL sums and token counts on a batch, as is and with images shuffled across examples."""

    def step(params: PyTree, frozen: PyTree, batch: Batch) -> dict[str, Array]:
        shuffled = dict(batch, media=jnp.roll(batch["media"], 1, axis=0))
        return dict(
            nll=batch_nll(parts, params, frozen, batch),
            nll_shuffled=batch_nll(parts, params, frozen, shuffled),
            tokens=jnp.sum(batch["loss_mask"]),
        )

    return step


def make_embed_step(parts: ModelParts) -> Callable[[PyTree, PyTree, Batch], dict[str, Array]]:
    """The contrastive stage's evaluation: image and text embeddings of a batch of pairs (retrieval and
    zero-shot classification are computed from them, `flamingo_jax.evals.contrastive`)."""

    def step(params: PyTree, frozen: PyTree, batch: Batch) -> dict[str, Array]:
        model = parts.merge(params, frozen)
        out = {}
        if "media" in batch:
            out["image"] = model.embed_images(batch["media"][:, 0, 0])
        if "text" in batch:
            out["text"] = model.embed_text(batch["text"], batch["text_mask"])
        if "row_mask" in batch:
            out["row_mask"] = batch["row_mask"]
        return out

    return step
