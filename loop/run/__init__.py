"""What keeps a run safe on disk and across processes: checkpoints and their integrity, `best/`, the output
folder, its lock, disk space, the Accelerator, determinism and clean stops."""
