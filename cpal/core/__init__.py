"""Shared plumbing every phase uses: params and schema, atomic file I/O, runtime (devices, threads, locks),
metrics, checkpoints and the resumable training loop, DDP."""
