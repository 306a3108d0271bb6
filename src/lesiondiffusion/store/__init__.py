"""Synthetic sample store: a background producer feeding a bounded queue, and an offline disk cache.

The producer (a spawned process by default, or a thread) builds the generator once, keeps it resident
and fills a bounded queue with ready-to-train synthetic cases. Consumers (the training data loader,
possibly in several augmentation worker processes) draw through a ``StoreClient`` that never blocks
while a case is available, reuses each case at most ``reuse`` times and counts hits and misses in
shared counters. The ``OfflineCache`` writes the same cases to disk once (resumable, atomic) and
``OfflineCacheReader`` serves them with no generator loaded.

Cases travel as files in a spool folder (``/dev/shm`` when available) and only their paths go
through the queue: a path is a message far below the pipe's atomic-write size, so stopping or
killing the producer can never leave half a message that would block a reader, and the producer
never holds unread cases in its queue feeder.

One module per part; every name is importable from ``lesiondiffusion.store`` as before:

- ``case``: ``SyntheticCase``, ``validate_case``, ``save_case``/``load_case`` (the .npz format)
- ``counters``: the shared hit/miss counters and ``StoreStats``
- ``throttle``: ``Throttle`` (the producer's duty cycle) and ``ThrottleController`` (the trainer side)
- ``faults``: ``ProducerCrashed``, ``exit_reason``, ``record_fault`` (failures of other processes)
- ``producer``: the producer loop (in the spawned process or thread)
- ``sample_store``: ``SampleStore`` (producer, queue, spool folder) and the spool-folder helpers
- ``client``: ``StoreClient`` (the consumer side)
- ``identity``: sha256 digests and the difference of two cache identities
- ``offline_cache``: ``Shard``, ``OfflineCache``, ``OfflineCacheReader``
"""

from __future__ import annotations

from .case import CaseFactory, SyntheticCase, load_case, save_case, validate_case
from .client import StoreClient
from .counters import DROPPED, FAILED, FRESH, MISSED, PRODUCED, REUSED, WAITED, SharedCounters, StoreStats
from .faults import FAULT_ENV, ProducerCrashed, exit_reason, record_fault
from .identity import file_digest, folder_digest, identity_changes
from .offline_cache import MANIFEST, OfflineCache, OfflineCacheReader, Shard, case_is_intact
from .sample_store import SampleStore, check_spool_space, spool_base
from .throttle import Throttle, ThrottleController

__all__ = [
    "CaseFactory", "SyntheticCase", "load_case", "save_case", "validate_case",
    "StoreClient",
    "DROPPED", "FAILED", "FRESH", "MISSED", "PRODUCED", "REUSED", "WAITED", "SharedCounters", "StoreStats",
    "FAULT_ENV", "ProducerCrashed", "exit_reason", "record_fault",
    "file_digest", "folder_digest", "identity_changes",
    "MANIFEST", "OfflineCache", "OfflineCacheReader", "Shard", "case_is_intact",
    "SampleStore", "check_spool_space", "spool_base",
    "Throttle", "ThrottleController",
]
