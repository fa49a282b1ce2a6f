"""The merged view: every open step of every site, with its order document, as the
Modality Worklist answers from it.

Written from the event loop (the intake, the topic follower), read from pynetdicom's
association threads: a lock guards the dictionary, and a reader gets a list it may
keep (:meth:`MergedView.open_items`).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from pydicom.dataset import Dataset

from radflow_core.events import WorklistItem
from radflow_core.order_document import OrderDocument
from worklist.mwl import item_dataset


@dataclass(frozen=True)
class OpenItem:
    item: WorklistItem
    document: OrderDocument
    dataset: Dataset
    """The full worklist data set, built once (answers copy from it, never change it)."""


class MergedView:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[bytes, OpenItem] = {}

    def put(self, item: WorklistItem, document: OrderDocument) -> None:
        entry = OpenItem(item, document, item_dataset(document))
        with self._lock:
            self._items[item.key] = entry

    def remove(self, key: bytes) -> None:
        with self._lock:
            self._items.pop(key, None)

    def get(self, key: bytes) -> OpenItem | None:
        with self._lock:
            return self._items.get(key)

    def document_sha(self, key: bytes) -> str | None:
        entry = self.get(key)
        return None if entry is None else entry.item.document.sha256

    def of_order(self, site: str, order_ref: str) -> list[OpenItem]:
        prefix = f"{site}/{order_ref}/".encode()
        with self._lock:
            return [v for k, v in self._items.items() if k.startswith(prefix)]

    def open_items(self, sites: frozenset[str]) -> list[OpenItem]:
        with self._lock:
            return [v for v in self._items.values() if v.item.site in sites]

    def per_site(self) -> Counter[str]:
        with self._lock:
            return Counter(v.item.site for v in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
