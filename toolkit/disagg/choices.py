"""Names of the disaggregation choices, readable without importing NIXL, ZMQ or JAX.

``transfer.backend``: how KV moves from a prefill engine into a decode engine's pages
(``pair.make_backend`` builds them):
  none    -- no transfer: the unified role (one engine does both prefill and decode)
  nixl    -- real NIXL agents (UCX; DRAM for CPU arrays, VRAM for GPU arrays): nixl_backend
  inproc  -- two engines in one process, a jitted copy with the same protocol: inproc_backend
``PD_ROLES``: the roles that need a transfer backend (``pair.make_worker``: one worker
class each, prefill.py and decode.py).
"""

PD_TRANSFER_BACKENDS = ("nixl", "inproc")  # the ones that move KV (the P/D roles need one)
TRANSFER_BACKENDS = ("none", *PD_TRANSFER_BACKENDS)
PD_ROLES = ("prefill", "decode")
