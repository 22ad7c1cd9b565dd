"""Group-wise integer quantization of the KV cache."""
