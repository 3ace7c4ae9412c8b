"""Input pipelines: raw sources -> TFDS builders (ArrayRecord) -> Grain loaders -> numpy batches.

Public API (import the submodules; this package imports nothing heavy by itself):

Tokenizer (`flamingo_jax.data.tokenizer`)
  Tokenizer.from_path(path, model_vocab_size=None)   SentencePiece `.model` or HF `tokenizer.json` (local).
    .base_vocab_size            the LM's embedding rows (model_vocab_size; else the tokenizer's own size, which
                                may be smaller: .own_vocab_size); NUM_ADDED_TOKENS = 3 rows follow it:
    .image_id = base_vocab_size (`<image>`), .eoc_id = base_vocab_size + 1 (`<|endofchunk|>`),
    .pad_id = own pad id if any, else base_vocab_size + 2;  .bos_id (may be None), .eos_id, .vocab_size
    .adds_bos                   whether the tokenizer's own files prepend BOS (the loaders' `add_bos=None`)
    .encode(text) -> list[int]  (literal `<image>`/`<|endofchunk|>` -> their ids), .decode(ids) -> str

Builders (`flamingo_jax.data.builders`), one TFDS builder per kind, local sources only:
  build(kind, source_dir, data_dir, overwrite=False) -> report   kind in {'interleaved', 'pairs', 'video'};
    reuses a complete build, restarts an interrupted one; report = records written / skipped (by reason),
    also saved as DATA_DIR/<builder>/1.0.0/build_report.json.  CLI: python -m flamingo_jax.data.builders.
  Source formats: see `sources.py` (JSONL + image files, WebDataset tars, CSV, WebVid CSV + videos).

Loaders (`flamingo_jax.data.loader`), Grain:
  default_dataset_config(kind) -> ConfigDict        every per-dataset field with its default.
  make_loader(ds_cfg, *, split, tokenizer, batch_size, image_size, seed, train, rows=None, num_epochs=None,
              worker_count=0) -> LoaderIterator    batch_size is global; this host reads `rows` of each batch
    next() -> {media u8[B,M,T,S,S,3], media_mask bool[B,M], tokens i32[B,L], targets i32[B,L],
               loss_mask f32[B,L], link_next bool[B]};  get_state() -> bytes (JSON), set_state(state);
    .skipped / .metrics (load-time decode failures, batches, seconds waited in next()), .close().
    Infinite when train=True, one pass (partial last batch dropped) when train=False or num_epochs=1;
    a background thread prefetches `prefetch_batches` batches; worker_count > 0 adds Grain processes.
  make_mixture(data_cfg, *, tokenizer, image_size, seed, rows_for=None, batch_sizes=None)
      -> {name: LoaderIterator};  make_eval_mixture(...) (one pass, eval split)
  host_rows.batch_rows(mesh, rules, global_batch_size) -> sorted rows this process's devices hold (= reads);
  host_rows.global_array(local, sharding, global_shape) -> the global jax.Array from those rows
  get_state(iterators) -> {name: str};  set_state(iterators, states)

Synthetic data (`flamingo_jax.data.synthetic`):
  python -m flamingo_jax.data.synthetic --out=DIR [--seed --num_train --num_eval --image_size --build]
  prepare_synthetic(root, ...) -> {'tokenizer', 'data_dirs', 'reports'}   sources + builds, idempotent.
  synthetic_data_config(root) -> data ConfigDict of the mixture 'm3w', 'ltip', 'align', 'vtp'.
  faults.add_broken_records(src_root) -> expected skip counts   (bad-input tests of the builders)

Lower level: `preprocess` (image/video decoding, resize/crop, augmentation, frame sampling), `examples`
(token sequences: caption packing, interleaved windows), `sources` (raw format readers).
"""
