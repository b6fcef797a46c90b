"""Ranks, collectives with deadlines, and agreement (an error on any rank raises on all).

Everything here is the single-process answer when ``torch.distributed`` is not
initialised, so the layers above call it unconditionally. Collectives carry
JSON, never pickle, and every wait has a deadline (``CKPTMGR_DIST_TIMEOUT``).
"""
from .agreement import agree
from .collectives import (
                          all_agree,
                          all_gather_json,
                          barrier,
                          broadcast_json,
                          default_timeout,
                          get_local_rank,
                          get_rank,
                          get_world_size,
                          is_distributed,
                          is_rank_zero,
                          new_control_group,
                          rank_zero_first,
)

__all__ = ["is_distributed", "get_rank", "get_world_size", "get_local_rank", "is_rank_zero", "default_timeout",
           "barrier", "all_agree", "broadcast_json", "all_gather_json", "rank_zero_first", "new_control_group",
           "agree"]
