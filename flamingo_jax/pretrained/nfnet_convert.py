"""DeepMind's released NFNet weights -> safetensors in our parameter layout, and a loader for the result.

DeepMind's files (`F0_haiku.npz` ... `F7_haiku.npz`, despite the suffix) are (dill) pickles of a haiku
parameter dict `{module: {param: array}}`:

    NFNet/~/stem_conv{0..3}                         w [3, 3, in, out] (HWIO), gain [out], bias [out]
    NFNet/~/nf_block, NFNet/~/nf_block_{k}          skip_gain []   (haiku names the first block 'nf_block')
    NFNet/~/nf_block_{k}/~/conv0|conv1|conv1b|conv2|conv_shortcut          w, gain, bias
    NFNet/~/nf_block_{k}/~/squeeze_excite/~/linear|linear_1                w [in, out], b [out]
    NFNet/~/final_conv (w, gain, bias), NFNet/~/linear (w, b)               the classifier head

Unpickling runs arbitrary code, so it happens only here, once, behind an explicit flag:

    python -m flamingo_jax.pretrained.nfnet_convert --src=F6_haiku.npz --out=f6.safetensors --allow_pickle

The output holds one tensor per parameter of our `NFNet` (blocks after each stage's first are stacked along a
leading `layers` dim, like the model), named by its '/'-joined path, plus the architecture in the file's
metadata; `load_nfnet` rebuilds the model from that and reads the tensors shard by shard. The trainer only
ever reads safetensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from flamingo_jax import sharding as sharding_lib
from flamingo_jax.models import nfnet
from flamingo_jax.pretrained import load

FORMAT = "flamingo_jax/nfnet"
# haiku's jax.nn.gelu defaulted to the tanh approximation; the released weights expect exactly that.
DEEPMIND_ACTIVATION = "scaled_gelu_tanh"
# DeepMind's NFNet pipeline normalises images with ImageNet's statistics (MEAN_RGB / STDDEV_RGB).
DEEPMIND_MEAN, DEEPMIND_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CONVS = ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut")


class PickleRefused(RuntimeError):
    """The source is a pickle and the caller did not opt in with allow_pickle."""


# ----------------------------------------------------------------------------------------------------------
# Reading DeepMind's file.
def read_deepmind_params(src: str | Path, *, allow_pickle: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """`{module: {param: ndarray}}` from DeepMind's NFNet file (a pickle, or an .npz of 'module/param')."""
    src = Path(src)
    if zipfile.is_zipfile(src):
        # A real npz: plain arrays need no unpickling. Keys are 'module/param'; module names contain '/'.
        out: dict[str, dict[str, np.ndarray]] = {}
        with np.load(src, allow_pickle=False) as z:
            for key in z.files:
                module, _, param = key.rpartition("/")
                out.setdefault(module, {})[param] = z[key]
        return out
    if not allow_pickle:
        raise PickleRefused(
            f"refusing to unpickle {src}: unpickling can run arbitrary code. If you trust this "
            f"file (e.g. DeepMind's own release), re-run with --allow_pickle"
        )
    with open(src, "rb") as f:
        try:
            import dill  # DeepMind saved with dill; plain pickle reads the common case without it.

            tree = dill.load(f)
        except ImportError:
            tree = pickle.load(f)
    if not isinstance(tree, Mapping):
        raise ValueError(f"{src}: expected a dict of modules, got {type(tree).__name__}")
    return {str(m): {str(k): np.asarray(v) for k, v in dict(params).items()} for m, params in tree.items()}


def _root(params: Mapping[str, Any]) -> str:
    stems = [m for m in params if m.endswith("stem_conv0")]
    if len(stems) != 1:
        raise ValueError(f"expected exactly one '*stem_conv0' module, found {stems or 'none'}: not an NFNet file")
    return stems[0][: -len("stem_conv0")]


def _blocks(params: Mapping[str, Any], root: str) -> list[str]:
    """Block module names in order; haiku calls block 0 'nf_block' and block k 'nf_block_k'."""
    pattern = re.compile(re.escape(root) + r"nf_block(?:_(\d+))?")
    found: dict[int, str] = {}
    for m in params:
        head = m.split("/~/")
        name = "/~/".join(head[: root.count("/~/") + 1])
        match = pattern.fullmatch(name)
        if match:
            found[int(match.group(1) or 0)] = name
    if sorted(found) != list(range(len(found))) or not found:
        raise ValueError(f"NFNet block modules are not numbered 0..N-1: {sorted(found)}")
    return [found[i] for i in range(len(found))]


def infer_architecture(params: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """NFNet constructor arguments (widths, depths, stem_widths, group_size, se_ratio, head) from shapes."""
    root = _root(params)
    w = lambda module, p="w": params[module][p]
    stem_widths = [int(w(f"{root}stem_conv{i}").shape[-1]) for i in range(4)]
    widths: list[int] = []
    depths: list[int] = []
    group_sizes, se_ratios = set(), set()
    for block in _blocks(params, root):
        out_ch = int(w(f"{block}/~/conv2").shape[-1])
        # Every stage starts with a transition block (stride or width change): the only ones with a shortcut.
        if f"{block}/~/conv_shortcut" in params:
            widths.append(out_ch)
            depths.append(0)
        elif not widths or widths[-1] != out_ch:
            raise ValueError(f"{block}: width {out_ch} without a shortcut conv; cannot place it in a stage")
        depths[-1] += 1
        group_sizes.add(int(w(f"{block}/~/conv1").shape[2]))
        hidden = int(w(f"{block}/~/squeeze_excite/~/linear").shape[-1])
        se_ratios.add(hidden / out_ch)
    if len(group_sizes) != 1 or len(se_ratios) != 1:
        raise ValueError(f"blocks disagree on group size {sorted(group_sizes)} or SE ratio {sorted(se_ratios)}")
    arch: dict[str, Any] = dict(
        widths=widths,
        depths=depths,
        stem_widths=stem_widths,
        group_size=group_sizes.pop(),
        se_ratio=se_ratios.pop(),
        num_classes=None,
        final_conv_mult=2.0,
    )
    if f"{root}linear" in params and f"{root}final_conv" in params:
        arch["num_classes"] = int(w(f"{root}linear").shape[-1])
        arch["final_conv_mult"] = int(w(f"{root}final_conv").shape[-1]) / widths[-1]
    return arch


def _abstract_nfnet(arch: Mapping[str, Any], **kw: Any) -> nfnet.NFNet:
    return nnx.eval_shape(lambda: nfnet.NFNet(None, **arch, rngs=nnx.Rngs(0), **kw))


def _deepmind_name(path: Sequence[str], root: str, stage_blocks: Sequence[list[str]]) -> list[tuple[str, str]]:
    """(module, param) in DeepMind's file for our parameter `path`, one per stacked layer (else just one)."""
    leaf_of = {"kernel": "w", "gain": "gain", "bias": "bias"}
    head, leaf = path[:-1], path[-1]

    def module_param(modules: list[str], sub: Sequence[str]) -> list[tuple[str, str]]:
        if tuple(sub) == ():
            return [(m, leaf) for m in modules]  # skip_gain lives on the block itself
        if sub[0] == "se" and len(sub) == 2 and sub[1] in ("fc0", "fc1"):
            lin = "linear" if sub[1] == "fc0" else "linear_1"
            return [(f"{m}/~/squeeze_excite/~/{lin}", {"kernel": "w", "bias": "b"}[leaf]) for m in modules]
        if len(sub) == 1 and sub[0] in _CONVS:
            return [(f"{m}/~/{sub[0]}", leaf_of[leaf]) for m in modules]
        raise KeyError(path)

    if head[0] == "stem" and len(head) == 2:
        return [(f"{root}stem_conv{head[1]}", leaf_of[leaf])]
    if head[0] == "stages":
        blocks = stage_blocks[int(head[1])]
        modules = blocks[:1] if head[2] == "first" else blocks[1:]
        return module_param(modules, head[3:])
    if head == ("final_conv",):
        return [(f"{root}final_conv", leaf_of[leaf])]
    if head == ("fc",):
        return [(f"{root}linear", {"kernel": "w", "bias": "b"}[leaf])]
    raise KeyError(path)


def convert_params(
    params: Mapping[str, Mapping[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(our '/'-joined parameter path -> array, architecture) for DeepMind's `{module: {param: array}}`."""
    arch = infer_architecture(params)
    root = _root(params)
    blocks = _blocks(params, root)
    stage_blocks, start = [], 0
    for d in arch["depths"]:
        stage_blocks.append(blocks[start : start + d])
        start += d
    model = _abstract_nfnet(arch)
    out: dict[str, np.ndarray] = {}
    used: set[tuple[str, str]] = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        name, shape = "/".join(path), tuple(var.get_value().shape)
        try:
            sources = _deepmind_name(path, root, stage_blocks)
        except KeyError:
            raise ValueError(f"our NFNet parameter {name} {shape} has no known DeepMind name") from None
        stacked = path[2:3] == ("rest",)
        arrays = []
        for module, param in sources:
            if param == "bias" and "bias" not in params.get(module, {}):
                param = "b"  # older haiku convs
            if param not in params.get(module, {}):
                raise load.CheckpointError(
                    f"tensor '{module}/{param}' (for {name}, expected shape "
                    f"{shape[1:] if stacked else shape}) is missing"
                )
            used.add((module, param))
            arrays.append(np.asarray(params[module][param]))
        array = np.stack(arrays) if stacked else arrays[0]
        if array.size != int(np.prod(shape)):
            raise load.CheckpointError(f"tensor for {name}: DeepMind shape {array.shape}, expected shape {shape}")
        out[name] = array.reshape(shape)  # e.g. a gain stored [1, 1, 1, C]
    extra = sorted(f"{m}/{p}" for m, ps in params.items() for p in ps if (m, p) not in used)
    if extra:
        raise load.CheckpointError(f"DeepMind tensors with no NFNet parameter: {extra[:8]}")
    return out, arch


def convert(src: str | Path, out: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Converts DeepMind's NFNet file `src` into our safetensors `out`; returns the architecture."""
    params = read_deepmind_params(src, allow_pickle=allow_pickle)
    tensors, arch = convert_params(params)
    metadata = dict(
        format=FORMAT,
        architecture=json.dumps(arch),
        activation=DEEPMIND_ACTIVATION,
        image_mean=json.dumps(DEEPMIND_MEAN),
        image_std=json.dumps(DEEPMIND_STD),
        source=Path(src).name,
    )
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(out), metadata=metadata)
    return arch


# ----------------------------------------------------------------------------------------------------------
# Loading our converted file.
def read_metadata(path: str | Path) -> tuple[dict[str, Any], str]:
    """(architecture kwargs, activation name) stored in a converted file."""
    with load.TensorReader(path) as reader:
        meta = reader.metadata
    if meta.get("format") != FORMAT:
        raise load.CheckpointError(
            f"{path} is not a converted NFNet file (metadata format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    return json.loads(meta["architecture"]), meta.get("activation", DEEPMIND_ACTIVATION)


def image_stats(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the converted weights expect, from the file's metadata (older files: DeepMind's, ImageNet's)."""
    with load.TensorReader(path) as reader:
        meta = reader.metadata
    mean = json.loads(meta["image_mean"]) if "image_mean" in meta else DEEPMIND_MEAN
    std = json.loads(meta["image_std"]) if "image_std" in meta else DEEPMIND_STD
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def nfnet_sources(abstract_state: nnx.State, reader: load.TensorReader) -> tuple[dict[str, Any], list[str]]:
    """Our files are in our layout: every parameter is the tensor of the same name. The classifier head is
    ignored when the target model has none (a features-only vision tower)."""
    paths = [load.path_str(p) for p, _ in nnx.to_flat_state(abstract_state)]
    ignore = [] if any(p.startswith("fc/") for p in paths) else [r"final_conv/.*", r"fc/.*"]
    return {p: load.View(p) for p in paths}, ignore


def load_nfnet_state(path: str | Path, abstract_state: nnx.State, *, shardings: nnx.State | None = None) -> nnx.State:
    """An NFNet state (e.g. `nnx.state(abstract_flamingo.vision)`) read from a converted file, by shard."""
    with load.TensorReader(path) as reader:
        sources, ignore = nfnet_sources(abstract_state, reader)
        return load.load_state(reader, abstract_state, sources, shardings=shardings, ignore=ignore)


def load_nfnet(
    path: str | Path,
    *,
    features_only: bool = True,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    scan_blocks: bool = True,
    remat: str = "none",
) -> nfnet.NFNet:
    """The NFNet stored in a converted file (architecture and activation from its metadata)."""
    arch, activation = read_metadata(path)
    if features_only:
        arch = {**arch, "num_classes": None}
    elif arch.get("num_classes") is None:
        raise load.CheckpointError(f"{path} has no classifier head; load it with features_only=True")

    def make() -> nfnet.NFNet:
        return nfnet.NFNet(
            None,
            **arch,
            activation=activation,
            scan_blocks=scan_blocks,
            remat=remat,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )

    return load.load_module(make, path, nfnet_sources, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flamingo_jax.pretrained.nfnet_convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--src", required=True, help="DeepMind's NFNet weights (e.g. F6_haiku.npz)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help="allow unpickling --src (pickles can run arbitrary code: trusted files only)",
    )
    args = parser.parse_args(argv)
    try:
        arch = convert(args.src, args.out, allow_pickle=args.allow_pickle)
    except PickleRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.info("converted %s -> %s", args.src, args.out)
    print(f"wrote {args.out}: NFNet {json.dumps(arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
