"""The test suite: unit/ (in-process), integration/ (multi-process, training runs, S3, Slurm, subprocesses),
helpers/ (workers and servers they start), golden/ (data). A package, so tests import helpers by their full
name (``from tests.helpers.s3_server import S3Server``) with the repository root on the path (pyproject.toml)."""
