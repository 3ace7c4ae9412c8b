"""Grain loaders on built synthetic data (with broken records mixed in): batch invariants, sharding,
determinism, iterator state restored in a fresh process, mixtures, load-time corruption."""

import hashlib
import json
import os
import subprocess
import sys
import time

import grain.python as grain
import numpy as np
import pytest

from flamingo_jax.data import builders, faults, loader, synthetic
from flamingo_jax.data.tokenizer import Tokenizer

NUM_TRAIN, NUM_EVAL, SIZE = 16, 8, 32
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader"))
    src = synthetic.write_sources(
        os.path.join(root, "sources"), seed=2, num_train=NUM_TRAIN, num_eval=NUM_EVAL, image_size=SIZE
    )
    faults.add_broken_records(os.path.join(root, "sources"))
    reports = {n: builders.build(k, src[n], os.path.join(root, n)) for n, k in synthetic.KIND_OF.items()}
    cfg = synthetic.synthetic_data_config(root)
    return cfg, Tokenizer.from_path(src["tokenizer"]), reports


def _loader(data, name, **kwargs):
    cfg, tok, _ = data
    args = dict(
        split="train",
        tokenizer=tok,
        batch_size=2,
        image_size=SIZE,
        seed=0,
        train=True,
    )
    return loader.make_loader(cfg.datasets[name], **(args | kwargs))


def _check_batch(batch, ds_cfg, tok, batch_size):
    ds = loader.with_defaults(ds_cfg)
    b, m, t, s, L = batch_size, ds.max_media, ds.frames, SIZE, ds.seq_len
    expected = {
        "media": ((b, m, t, s, s, 3), np.uint8),
        "media_mask": ((b, m), np.bool_),
        "tokens": ((b, L), np.int32),
        "targets": ((b, L), np.int32),
        "loss_mask": ((b, L), np.float32),
        "link_next": ((b,), np.bool_),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    # Every `<image>` has its media, in order; empty slots are all zero.
    np.testing.assert_array_equal((tokens == tok.image_id).sum(1), batch["media_mask"].sum(1))
    assert not batch["media"][~batch["media_mask"]].any()
    for row in batch["media"][batch["media_mask"]]:
        assert row.any()
    # Targets are the next tokens; the mask is off exactly on padding and `<image>` targets.
    np.testing.assert_array_equal(targets[:, :-1][mask[:, :-1] > 0], tokens[:, 1:][mask[:, :-1] > 0])
    assert not mask[targets == tok.image_id].any()
    assert set(np.unique(mask)) <= {0.0, 1.0}
    if ds.kind != "interleaved":
        assert (tokens[:, 0] == tok.image_id).all() and not batch["link_next"].any()
        for row, mrow in zip(tokens, mask):
            n = int(mrow.sum())  # Caption + <|endofchunk|> targets, then padding.
            assert row[0] == tok.image_id and row[n] == tok.eoc_id
            assert (row[n + 1 :] == tok.pad_id).all()


@pytest.mark.parametrize("name", synthetic.NAMES)
def test_batch_invariants(data, name):
    cfg, tok, _ = data
    it = _loader(data, name, batch_size=3)
    for _ in range(4):
        _check_batch(next(it), cfg.datasets[name], tok, 3)
    assert it.skipped == 0 and it.metrics["batches"] == 4


def test_interleaved_caps_media(data):
    cfg, tok, _ = data
    ds = cfg.datasets.m3w.copy_and_resolve_references()
    ds.max_media, ds.seq_len = 2, 64
    it = loader.make_loader(
        ds,
        split="train",
        tokenizer=tok,
        batch_size=4,
        image_size=SIZE,
        seed=3,
        train=True,
    )
    seen = 0
    for _ in range(5):
        batch = next(it)
        _check_batch(batch, ds, tok, 4)
        seen += int(batch["media_mask"].sum())
    assert seen > 0


@pytest.mark.parametrize("name", synthetic.NAMES)
def test_one_pass_reads_every_written_record(data, name):
    """With broken records in the source, a pass yields exactly the records the builder wrote."""
    _, _, reports = data
    written = reports[name]["splits"]["train"]["written"]
    it = _loader(data, name, batch_size=1, train=False)
    batches = list(it)
    assert len(batches) == written == it.num_records and it.skipped == 0


def _fingerprints(batches):
    out = []
    for batch in batches:
        for i in range(len(batch["tokens"])):
            h = hashlib.sha1(batch["tokens"][i].tobytes() + batch["media"][i].tobytes())
            out.append(h.hexdigest())
    return out


@pytest.mark.parametrize("train", [False, True])
def test_two_hosts_read_disjoint_shards_covering_the_split(data, train):
    full = _fingerprints(_loader(data, "ltip", split="eval", batch_size=1, train=train, num_epochs=1))
    assert len(full) == len(set(full)) == NUM_EVAL
    hosts = [
        _fingerprints(
            _loader(
                data,
                "ltip",
                split="eval",
                batch_size=2,  # global: host i reads row i of each
                train=train,
                num_epochs=1,
                rows=[i],
            )
        )
        for i in range(2)
    ]
    assert set(hosts[0]).isdisjoint(hosts[1])
    assert sorted(hosts[0] + hosts[1]) == sorted(full)
    # An odd split (17 records): each host reads floor(17 / 2) so that all hosts run equally many steps.
    odd = [_fingerprints(_loader(data, "ltip", batch_size=2, train=False, rows=[i])) for i in range(2)]
    assert len(odd[0]) == len(odd[1]) == 8 and set(odd[0]).isdisjoint(odd[1])


def test_deterministic_by_seed(data):
    a = _fingerprints(next(_loader(data, "m3w", seed=5)) for _ in range(3))
    b = _fingerprints(next(_loader(data, "m3w", seed=5)) for _ in range(3))
    c = _fingerprints(next(_loader(data, "m3w", seed=6)) for _ in range(3))
    assert a == b and a != c


_RESTORE = """
import hashlib, json, sys
from flamingo_jax.data import loader
from flamingo_jax.data.tokenizer import Tokenizer
import ml_collections
args = json.loads(sys.argv[1])
it = loader.make_loader(ml_collections.ConfigDict(args["ds"]), tokenizer=Tokenizer.from_path(args["tok"]),
                        **args["kw"])
with open(args["state"]) as f:
    it.set_state(f.read())
out = []
for _ in range(args["n"]):
    b = next(it)
    out += [hashlib.sha1(b["tokens"][i].tobytes() + b["media"][i].tobytes()).hexdigest()
            for i in range(len(b["tokens"]))]
print(json.dumps({"fp": out, "skipped": it.skipped, "batches": it.batches}))
"""


@pytest.mark.parametrize(("name", "workers"), [("m3w", 0), ("vtp", 0), ("ltip", 1)])
def test_state_restored_in_fresh_process_continues_exactly(data, tmp_path, name, workers):
    cfg, tok, _ = data
    kw = dict(
        split="train",
        batch_size=3,
        image_size=SIZE,
        seed=7,
        train=True,
        worker_count=workers,
    )
    ds = cfg.datasets[name].to_dict()
    ds["augment"] = True  # Random flips/jitter too must replay exactly.
    it = loader.make_loader(ds, tokenizer=tok, **kw)
    for _ in range(4):  # Mid-stream, past the first epoch of the smaller sets.
        next(it)
    state = it.get_state()
    json.loads(state)  # JSON, loadable anywhere.
    (tmp_path / "state.json").write_bytes(state)
    expected = _fingerprints(next(it) for _ in range(3))
    args = {"ds": ds, "tok": tok.path, "kw": kw, "state": str(tmp_path / "state.json"), "n": 3}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _RESTORE, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fp"] == expected and got["batches"] == 7


def test_mixture_and_state_helpers(data):
    cfg, tok, _ = data
    # This host reads the even rows of every global batch (its devices' rows on some mesh).
    kw = dict(tokenizer=tok, image_size=SIZE, seed=1, rows_for=lambda b: range(0, b, 2))
    sizes = {"m3w": 4, "ltip": 6, "align": 6, "vtp": 2}  # global
    mix = loader.make_mixture(cfg, batch_sizes=sizes, **kw)
    assert sorted(mix) == sorted(synthetic.NAMES)
    for name, it in mix.items():
        _check_batch(next(it), cfg.datasets[name], tok, sizes[name] // 2)
    states = json.loads(json.dumps(loader.get_state(mix)))
    expected = {name: _fingerprints([next(it)]) for name, it in mix.items()}
    mix2 = loader.make_mixture(cfg, batch_sizes=sizes, **kw)
    loader.set_state(mix2, states)
    assert {name: _fingerprints([next(it)]) for name, it in mix2.items()} == expected
    # Without explicit sizes: each dataset's global batch_size, of which this host reads half.
    mix3 = loader.make_mixture(cfg, **kw)
    assert next(mix3["ltip"])["tokens"].shape[0] == cfg.datasets.ltip.batch_size // 2
    with pytest.raises(KeyError):
        loader.set_state(mix2, {"m3w": states["m3w"]})


def test_eval_mixture_is_one_pass(data):
    cfg, tok, _ = data
    mix = loader.make_eval_mixture(
        cfg,
        tokenizer=tok,
        image_size=SIZE,
        seed=0,
        batch_sizes={"m3w": 1, "ltip": 3, "align": 3, "vtp": 2},
    )
    counts = {name: len(list(it)) for name, it in mix.items()}
    n = synthetic.counts(NUM_EVAL)
    assert counts == {"m3w": n["m3w"], "ltip": n["ltip"] // 3, "align": n["align"] // 3, "vtp": n["vtp"] // 2}


def test_link_next_rate(data):
    it = _loader(data, "m3w", batch_size=8)
    flags = np.concatenate([next(it)["link_next"] for _ in range(10)])
    assert 0.25 < flags.mean() < 0.75
    cfg, tok, _ = data
    ds = cfg.datasets.m3w.copy_and_resolve_references()
    ds.p_next = 0.0
    it = loader.make_loader(
        ds,
        split="train",
        tokenizer=tok,
        batch_size=8,
        image_size=SIZE,
        seed=0,
        train=True,
    )
    assert not next(it)["link_next"].any()


def test_load_time_corruption_is_masked_and_counted(data):
    """A record that fails to decode after the build: a fully masked row, counted, no crash."""
    cfg, tok, _ = data
    good = builders.open_builder("pairs", cfg.datasets.ltip.data_dir).as_data_source("eval")[0]
    records = [good, {"id": b"bad", "image": b"\x00garbage", "caption": b"a red circle"}, good, good]
    ds = loader.with_defaults(cfg.datasets.ltip)
    dl = grain.DataLoader(
        data_source=records,
        sampler=grain.IndexSampler(num_records=4, shuffle=False, num_epochs=1, seed=0),
        operations=[loader.ToExample(ds, tok, SIZE, True), grain.Batch(2, drop_remainder=True)],
        shard_options=grain.NoSharding(),
    )
    it = loader.LoaderIterator(dl, name="t", image_id=tok.image_id, num_records=4)
    first, second = list(it)
    assert it.skipped == 1 and it.metrics["skipped"] == 1
    assert first["media_mask"].tolist() == [[True], [False]]
    assert first["loss_mask"][1].sum() == 0 and (first["tokens"][1] == tok.pad_id).all()
    assert not first["media"][1].any() and second["media_mask"].all()


def test_missing_data_dir_and_split_name_the_path(data, tmp_path):
    cfg, tok, _ = data
    ds = cfg.datasets.ltip.copy_and_resolve_references()
    with pytest.raises(ValueError, match="nosuch"):
        _loader(data, "ltip", split="nosuch")
    ds.data_dir = str(tmp_path / "not_built")
    with pytest.raises(FileNotFoundError, match="not_built"):
        loader.make_loader(
            ds,
            split="train",
            tokenizer=tok,
            batch_size=1,
            image_size=SIZE,
            seed=0,
            train=True,
        )


def test_prefetch_thread_gives_the_same_batches_and_states(data):
    cfg, *_ = data
    ds = cfg.datasets.align.copy_and_resolve_references()
    ds.augment = True
    its = {}
    for prefetch in (0, 3):
        ds.prefetch_batches = prefetch
        its[prefetch] = loader.make_loader(
            ds,
            split="train",
            tokenizer=data[1],
            batch_size=2,
            image_size=SIZE,
            seed=0,
            train=True,
        )
    for _ in range(3):
        a, b = next(its[0]), next(its[3])
        assert _fingerprints([a]) == _fingerprints([b])
        assert its[0].get_state() == its[3].get_state()  # Not the state of batches still in the queue.
    time.sleep(0.2)  # Let the queue fill up.
    state = its[3].get_state()
    expected = _fingerprints(next(its[3]) for _ in range(4))
    its[3].set_state(state)
    assert _fingerprints(next(its[3]) for _ in range(4)) == expected
    its[3].close()


def test_video_eval_frames(data):
    cfg, tok, _ = data
    ds = cfg.datasets.vtp.copy_and_resolve_references()
    ds.eval_frames = 12
    kw = dict(tokenizer=tok, batch_size=2, image_size=SIZE, seed=0)
    assert next(loader.make_loader(ds, split="eval", train=False, **kw))["media"].shape[2] == 12
    assert next(loader.make_loader(ds, split="train", train=True, **kw))["media"].shape[2] == 8
