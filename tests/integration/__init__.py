"""Tests that launch processes: torchrun workers, training runs, the S3 server, Slurm, the CLIs."""
