"""Names of the prefix-cache policies (``cache.policy``), readable without importing the pool.

``none``: no prefix cache; every request computes its whole prompt and its pages go back
to the allocator when it finishes (the engine today). Policies that keep pages for reuse
(a radix tree) add their names here beside their implementation.
"""

CACHE_POLICIES = ("none",)
