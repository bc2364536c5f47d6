"""What the tests start: torchrun workers (run by path: they import only atoken), the S3 server, Slurm,
a local SigLIP2, and the parity script against the release's code."""
