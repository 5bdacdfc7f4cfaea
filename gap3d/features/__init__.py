"""The feature-shard format, owned here alone: schema and tensors
(`format`), what wrote them (`identity`), files on storage (`store`).

Preprocessing writes it, streaming emits its rows, training and evaluation read it, and the tests build it,
all through these modules.
"""
