"""XLA infrastructure: the backend seam, the device mesh, sharding and the errors users see.

Only `torchprime.backend.xla` imports torch_xla; everything else asks `torchprime.backend`.
"""
