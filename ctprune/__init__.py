"""ctprune: prune one trained Transformer into many variants cheaply, by composability."""

import os

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is
# set (read at its first such allocation). Training allocates 30-60 MB logits tensors every step;
# with 4 KB pages each costs thousands of page faults: about 7 % of a seed-preset bf16 step here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
