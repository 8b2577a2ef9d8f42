"""Names of the prefix-cache policies (``cache.policy``), readable without importing the pool.

``none``: no prefix cache; every request computes its whole prompt and its pages go back
to the allocator when it finishes. ``radix``: a page-granular radix tree of committed KV
(toolkit/cache/radix.py) owned by the CacheManager (toolkit/cache/manager.py); a request
computes only what follows its longest cached prefix. On every role: a decode worker
keeps each finished conversation's KV and asks prefill only for the pages it lacks.
"""

CACHE_POLICIES = ("none", "radix")
# the roles each policy runs on (validation refuses the others before anything is built)
POLICY_ROLES = {"none": ("unified", "prefill", "decode", "router"), "radix": ("unified", "prefill", "decode", "router")}

STORAGE_BACKENDS = ("none", "file")  # cache.storage: where pages go below the host tier
