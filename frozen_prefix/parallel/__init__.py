"""One rank of a torchrun group: the process group (distributed.py), FSDP's sharded tensors (sharding.py), and how
evaluation shares out its decoding (decoding.py). Nothing here knows the model; training/strategies.py wraps it."""
