"""Pretrained frozen towers: HF-format LMs and CLIP vision towers, and converted DeepMind NFNet weights.

All loaders read safetensors straight into their shards (`load.py`); nothing here unpickles, except the
explicit opt-in converter `python -m flamingo_jax.pretrained.nfnet_convert --allow_pickle`.
"""
