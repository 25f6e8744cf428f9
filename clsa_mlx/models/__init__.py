"""Other architectures of the family, one file each, with the contract of `clsa_mlx.model`."""
