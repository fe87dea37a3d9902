"""Pure loss functions on tensors. Imports nothing of kdkit outside this package."""
