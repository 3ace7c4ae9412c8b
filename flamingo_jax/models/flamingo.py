"""Flamingo: frozen vision encoder -> Perceiver Resampler -> frozen LM with GATED XATTN-DENSE blocks.

Inputs are media [batch, n_media, n_frames, H, W, 3] and token ids [batch, length]; which media a token sees
follows from the `<image>` tokens in the ids (`xattn.media_index`). What trains is a property of the parameter
tree: `trainable_filter(patterns)` selects parameters by path, and the trainer splits the state with it, so the
optimiser never holds, and autodiff never computes, anything for frozen weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import layers as layers_lib
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import nfnet, resampler, stacking, vit, xattn

Array = jax.Array

# The paper's split: the resampler, the cross-attention blocks and the added token rows train; the vision
# encoder and the LM stay frozen.
DEFAULT_TRAINABLE = ("resampler/.*", "xattn/.*", "lm/(embed|head)/added")


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_filter(patterns: Sequence[str]) -> nnx.filterlib.Filter:
    """An nnx filter: parameters whose '/'-joined path fully matches one of the regexes."""
    compiled = [re.compile(p) for p in patterns]

    def is_trainable(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and any(c.fullmatch(path_str(path)) for c in compiled)

    return is_trainable


def check_trainable_patterns(model: nnx.Module, patterns: Sequence[str]) -> None:
    """Every pattern must select at least one parameter: a typo must not silently freeze a component."""
    paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in patterns:
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise ValueError(
                f"model.trainable: pattern {pattern!r} matches no parameter (parameters look like {paths[:3]} ...)"
            )


VISION_KINDS = ("nfnet", "clip_vit")


# The statistics each tower family was trained with; a pretrained tower's own files override them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_STATS = {"nfnet": (IMAGENET_MEAN, IMAGENET_STD), "clip_vit": (vit.CLIP_MEAN, vit.CLIP_STD)}
DEFAULT_ACTIVATION = {"nfnet": "scaled_gelu", "clip_vit": "quick_gelu"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str = "nfnet"
    image_size: int = 320
    # None: the tower family's own (ImageNet's for NFNet, OpenAI CLIP's for a CLIP ViT). With `vision_pretrained`
    # set, the tower's files decide (`flamingo_jax.pretrained.towers.resolve`).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # None: 'scaled_gelu' (NFNet; DeepMind's released weights need 'scaled_gelu_tanh'), 'quick_gelu' (CLIP).
    activation: str | None = None
    # kind == 'nfnet'
    variant: str | None = "F6"
    widths: tuple[int, ...] | None = None
    depths: tuple[int, ...] | None = None
    stem_widths: tuple[int, ...] | None = None
    group_size: int = 128
    stochdepth_rate: float = 0.1  # NFNet's stochastic depth, when the encoder trains (stage 1, or trainable)
    # kind == 'clip_vit' (CLIP ViT-L/14 by default)
    patch_size: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        mean, std = DEFAULT_IMAGE_STATS.get(self.kind, (IMAGENET_MEAN, IMAGENET_STD))
        for name, value in (("mean", mean), ("std", std), ("activation", DEFAULT_ACTIVATION.get(self.kind))):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: defaults resolved once, at construction

    def vit_config(self) -> vit.ViTConfig:
        return vit.ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            act=self.activation,
            norm_eps=self.norm_eps,
        )

    def feature_dim(self) -> int:
        if self.kind == "clip_vit":
            return self.width
        if self.widths:
            return self.widths[-1]
        return nfnet.resolve_architecture(self.variant, self.widths, self.depths, None)[0][-1]

    def validate(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"model.vision.kind: {self.kind!r}; choose one of {VISION_KINDS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"model.vision.mean/std: 3 values each, std positive; got {self.mean} / {self.std}")
        if self.kind == "clip_vit":
            self.vit_config().validate("model.vision")
            if self.width % self.num_heads:
                raise ValueError(f"model.vision.num_heads={self.num_heads} must divide width={self.width}")
            if self.image_size % self.patch_size:
                raise ValueError(f"model.vision.patch_size={self.patch_size} must divide image_size={self.image_size}")
            return
        layers_lib.activation(self.activation)
        if not 0.0 <= self.stochdepth_rate < 1.0:
            raise ValueError(f"model.vision.stochdepth_rate={self.stochdepth_rate} must be in [0, 1)")
        try:
            widths, depths, _ = nfnet.resolve_architecture(self.variant, self.widths, self.depths, None)
        except ValueError as e:
            raise ValueError(f"model.vision: {e}") from e
        if len(widths) != len(nfnet.DEFAULT_STRIDES) or len(depths) != len(widths):
            raise ValueError(
                f"model.vision.widths/depths need {len(nfnet.DEFAULT_STRIDES)} stages, got {widths} / {depths}"
            )
        for w in widths:
            if int(w * nfnet.BOTTLENECK_RATIO) % self.group_size:
                raise ValueError(
                    f"model.vision.group_size={self.group_size} must divide every bottleneck "
                    f"width (half of each of {widths})"
                )


def vision_tower(
    v: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, attention: str, remat: str, rngs: nnx.Rngs
) -> nfnet.NFNet | vit.VisionTransformer:
    """The vision encoder `v` describes, as a feature extractor (no classifier head): Flamingo's frozen tower,
    and the image side of the stage-1 contrastive model."""
    if v.kind == "clip_vit":
        return vit.VisionTransformer(
            v.vit_config(), dtype=dtype, param_dtype=param_dtype, attention_impl=attention, remat=remat, rngs=rngs
        )
    return nfnet.NFNet(
        v.variant,
        widths=v.widths,
        depths=v.depths,
        stem_widths=v.stem_widths,
        group_size=v.group_size,
        activation=v.activation,
        num_classes=None,
        stochdepth_rate=v.stochdepth_rate,
        remat=remat,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    num_layers: int = 6
    num_latents: int = 64
    num_heads: int = 16
    head_dim: int = 128
    ffw_mult: int = 4
    max_frames: int = 8


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
    every: int = 1
    num_heads: int = 16
    head_dim: int = 128
    ffw_mult: int = 4
    # The paper starts the tanh gates at 0. That escapes zero only with large batches; tiny CPU runs (the demo)
    # start them slightly open, which gives up exact equality with the LM at initialisation.
    gate_init: float = 0.0


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
    vision: VisionConfig
    resampler: ResamplerConfig
    xattn: XAttnConfig
    lm: lm_lib.LMConfig
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    # Pretrained frozen towers: a Hugging Face LM directory (its config.json replaces `lm`), and for the vision
    # encoder a safetensors file from `flamingo_jax.pretrained.nfnet_convert` or a Hugging Face CLIP directory.
    lm_pretrained: str = ""
    vision_pretrained: str = ""
    # A frozen tower without pretrained weights is almost always a mistake (the paper's towers are pretrained):
    # the trainer refuses it unless this is set (tests, toy runs, compile-only planning do not need weights).
    allow_random_towers: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    frozen_param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlamingoConfig:
        d = dict(d)

        def sub(kls: type, key: str) -> Any:
            fields = dict(d.pop(key, {}) or {})
            known = {f.name for f in dataclasses.fields(kls)}
            unknown = sorted(set(fields) - known)
            if unknown:
                raise ValueError(f"model.{key}: unknown fields {unknown}")
            return kls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

        vision, res, xa = (
            sub(VisionConfig, "vision"),
            sub(ResamplerConfig, "resampler"),
            sub(XAttnConfig, "xattn"),
        )
        # With pretrained towers, `lm` and `vision` must already hold the towers' own settings:
        # `flamingo_jax.pretrained.towers.resolve` fills them from the files (config.model_config does).
        lm_dict = dict(d.pop("lm"))
        lm = lm_lib.LMConfig.from_dict(lm_dict)
        if "trainable" in d:
            d["trainable"] = tuple(d["trainable"])
        return cls(vision=vision, resampler=res, xattn=xa, lm=lm, **d)

    @property
    def num_xattn(self) -> int:
        return -(-self.lm.num_layers // self.xattn.every)

    @property
    def image_token_id(self) -> int:
        return self.lm.vocab_size  # the first added row; see flamingo_jax.data.tokenizer

    def validate(self) -> None:
        """Fails, naming the field, on any combination that cannot be built. Allocates nothing."""
        self.lm.validate("model.lm")
        for name, value in [
            ("model.resampler.num_layers", self.resampler.num_layers),
            ("model.resampler.num_latents", self.resampler.num_latents),
            ("model.resampler.num_heads", self.resampler.num_heads),
            ("model.resampler.head_dim", self.resampler.head_dim),
            ("model.resampler.max_frames", self.resampler.max_frames),
            ("model.xattn.every", self.xattn.every),
            ("model.xattn.num_heads", self.xattn.num_heads),
            ("model.xattn.head_dim", self.xattn.head_dim),
            ("model.vision.image_size", self.vision.image_size),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.xattn.every > self.lm.num_layers:
            raise ValueError(f"model.xattn.every={self.xattn.every} exceeds model.lm.num_layers={self.lm.num_layers}")
        for name in ("dtype", "param_dtype", "frozen_param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name}: {getattr(self, name)!r} is not float32/bfloat16/float16")
        if self.remat not in stacking.REMAT_POLICIES:
            raise ValueError(f"model.remat: {self.remat!r}; choose one of {sorted(stacking.REMAT_POLICIES)}")
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(f"model.attention: {self.attention!r}; choose 'xla' or 'cudnn'")
        self.vision.validate()
        for p in self.trainable:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"model.trainable: bad regex {p!r}: {e}") from e


class Flamingo(nnx.Module):
    def __init__(self, cfg: FlamingoConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        v = cfg.vision
        self.vision = vision_tower(
            v, dtype=dtype, param_dtype=pdtype, attention=cfg.attention, remat=cfg.remat, rngs=rngs
        )
        r = cfg.resampler
        vision_dim = v.feature_dim()
        self.resampler = resampler.PerceiverResampler(
            vision_dim,
            num_layers=r.num_layers,
            num_latents=r.num_latents,
            num_heads=r.num_heads,
            head_dim=r.head_dim,
            ffw_mult=r.ffw_mult,
            max_frames=r.max_frames,
            dtype=dtype,
            param_dtype=pdtype,
            attention_impl=cfg.attention,
            remat=cfg.remat,
            rngs=rngs,
        )
        x = cfg.xattn
        self.xattn = stacking.stack(
            lambda rr: xattn.GatedCrossAttention(
                cfg.lm.dim,
                vision_dim,
                num_heads=x.num_heads,
                head_dim=x.head_dim,
                ffw_mult=x.ffw_mult,
                gate_init=x.gate_init,
                dtype=dtype,
                param_dtype=pdtype,
                attention_impl=cfg.attention,
                rngs=rr,
            ),
            cfg.num_xattn,
            rngs,
        )
        self.lm = lm_lib.DecoderLM(
            cfg.lm, dtype=dtype, param_dtype=pdtype, attention_impl=cfg.attention, remat=cfg.remat, rngs=rngs
        )
        vision_paths = [path_str(("vision", *p)) for p, _ in nnx.to_flat_state(nnx.state(self.vision, nnx.Param))]
        self.vision_trains = any(re.fullmatch(p, vp) for p in cfg.trainable for vp in vision_paths)

    # -- vision ----------------------------------------------------------------------------------------------
    def encode_media(self, media: Array, *, rng: Array | None = None) -> Array:
        """media [B, N, T, H, W, 3] (uint8 or float in [0, 1]) -> visual tokens [B, N, latents, vision_dim].

        `rng` is a training step's key: the vision encoder runs in training mode (an NFNet's stochastic depth)
        only when it is given and the encoder trains. Without it, or with the encoder frozen, the encoding is
        deterministic and the key is unused (evaluation, generation and frozen-encoder training are unchanged).
        """
        b, n, t, h, w, c = media.shape
        dtype = jnp.dtype(self.cfg.dtype)
        x = media.astype(jnp.float32)
        if media.dtype == jnp.uint8:
            x = x / 255.0
        # The frames spread over every mesh axis (`vision_batch`) that divides their number, not only the batch's:
        # otherwise every `tensor` rank would encode the same frames. NFNet's weights are replicated; a ViT's are
        # gathered over `tensor` layer by layer. The resampler's inputs go back to `batch` sharding.
        x = sharding.constrain(x.reshape(b * n * t, h, w, c), ("vision_batch", None, None, None))
        x = (x - jnp.asarray(self.cfg.vision.mean)) / jnp.asarray(self.cfg.vision.std)
        if rng is not None and self.vision_trains and isinstance(self.vision, nfnet.NFNet):
            feats = self.vision.features(x.astype(dtype), train=True, rng=rng)
        else:  # a ViT has no stochastic regulariser: its training mode is its evaluation mode
            feats = self.vision.features(x.astype(dtype))
        if not self.vision_trains:
            feats = jax.lax.stop_gradient(feats)  # frozen: no backward pass through the encoder at all
        # NFNet gives a spatial grid [*, h, w, c], a ViT a token sequence [*, s, c]: both become s = h * w tokens.
        feats = feats.reshape(b * n, t, -1, feats.shape[-1])
        tokens = self.resampler(feats)
        return tokens.reshape(b, n, *tokens.shape[1:])

    # -- text ------------------------------------------------------------------------------------------------
    def _hook(self, visual: Array, idx: Array) -> lm_lib.CrossAttentionHook:
        return lm_lib.CrossAttentionHook(
            self.xattn, self.cfg.xattn.every, lambda block, h: block(h, visual.astype(h.dtype), idx)
        )

    def __call__(self, media: Array, ids: Array, *, link_next: Array | None = None, rng: Array | None = None) -> Array:
        """Logits [B, L, vocab + added] (float32). `rng`: a training step's key, see `encode_media`."""
        visual = self.encode_media(media, rng=rng)
        idx = xattn.media_index(ids, self.cfg.image_token_id, link_next=link_next, num_media=media.shape[1])
        logits, _ = self.lm(ids, hook=self._hook(visual, idx))
        return logits

    # -- generation ------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> dict[str, Array]:
        cache = self.lm.init_cache(batch, max_len)
        cache["images_before"] = jnp.zeros((batch,), jnp.int32)
        return cache

    def decode(
        self,
        visual: Array,
        ids: Array,
        cache: dict[str, Array],
        *,
        token_mask: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """One chunk (the prompt, then one token at a time) against visual tokens computed once."""
        if token_mask is None:
            token_mask = jnp.ones(ids.shape, bool)
        idx = xattn.media_index(ids, self.cfg.image_token_id, images_before=cache["images_before"])
        lm_cache = {k: v for k, v in cache.items() if k != "images_before"}
        logits, lm_cache = self.lm(ids, token_mask=token_mask, cache=lm_cache, hook=self._hook(visual, idx))
        seen = jnp.sum((ids == self.cfg.image_token_id) & token_mask, axis=1, dtype=jnp.int32)
        return logits, {**lm_cache, "images_before": cache["images_before"] + seen}
