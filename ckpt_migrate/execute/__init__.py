"""Execute a plan: compute the folded tensors, write the checkpoint into staging, publish it atomically."""
