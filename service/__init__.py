"""qwen-box's chat service: a Transformers model on CPU behind Flask.

One process-wide tuning must happen before torch starts oneDNN, so it is here, where every entry
point passes first: oneDNN keeps a compiled kernel, with its scratch memory, for every matrix shape
it has seen (1,024 by default). Attention's products change shape with every token, so that cache
only grew, by about 0.2 GiB over a few chats; 64 entries still hold every shape worth reusing (the
weights' own products), at the same speed. A value set by the user wins.
"""

import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
