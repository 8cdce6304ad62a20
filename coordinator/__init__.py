"""Coordinator: the decoding loop behind the public Generate stream."""
