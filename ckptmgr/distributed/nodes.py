"""Which ranks share a node (and so a node-local disk): the layout a tiered checkpoint writes by.

A tiered save writes each node's copy to that node's own disk, so ranks must
know who their node-mates are and which of them writes the replicated state.
Ranks are grouped by a node key: the host name plus ``GROUP_RANK`` (the node
rank torchrun gives each agent), so two launches on one machine, as in tests,
are two nodes. The node's leader is its lowest global rank (local rank 0
under torchrun). The layout is learned once with one all-gather.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .collectives import all_gather_json, get_rank, get_world_size

__all__ = ["NodeLayout", "node_key", "node_layout"]


def node_key() -> str:
    """This process's node: ``host/GROUP_RANK`` (``GROUP_RANK`` is empty outside torchrun)."""
    return f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '')}"


@dataclass(frozen=True)
class NodeLayout:
    """Ranks grouped by node.

    Attributes:
        rank: This process's global rank.
        leader_of: Global rank -> the leader (lowest rank) of its node.
    """

    rank: int
    leader_of: List[int]

    @property
    def world(self) -> int:
        """Number of ranks."""
        return len(self.leader_of)

    @property
    def leader(self) -> int:
        """The leader of this rank's node."""
        return self.leader_of[self.rank]

    @property
    def is_leader(self) -> bool:
        """True on the rank that writes the replicated state to this node's disk."""
        return self.leader == self.rank

    @property
    def leaders(self) -> List[int]:
        """Every node's leader, in rank order (one per node)."""
        return sorted(set(self.leader_of))

    def members(self, leader: int) -> List[int]:
        """The ranks of the node led by ``leader``."""
        return [r for r, lead in enumerate(self.leader_of) if lead == leader]

    def by_leader(self, replies: List[Any]) -> Dict[int, Any]:
        """Every node leader's entry of an all-gathered list."""
        return {lead: replies[lead] for lead in self.leaders}


def node_layout(group: Optional[Any] = None, key: Optional[str] = None) -> NodeLayout:
    """Learn which ranks share a node (a collective: every rank calls it).

    Args:
        group: Process group for the exchange (None: ckptmgr's control group).
        key: This rank's node key (default :func:`node_key`).

    Raises:
        DistributedError: another rank did not answer within the timeout.
    """
    keys = all_gather_json(key or node_key(), what="learning which ranks share a node", group=group)
    first: Dict[str, int] = {}
    for rank, k in enumerate(keys):
        first.setdefault(k, rank)
    return NodeLayout(get_rank(), [first[k] for k in keys]) if get_world_size() > 1 else NodeLayout(0, [0])
