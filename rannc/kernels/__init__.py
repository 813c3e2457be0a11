"""Device kernels that torch has no equivalent of, written in Triton (imported only where Triton is)."""
