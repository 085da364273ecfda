"""An in-memory cache of the objects the controllers read, fed by watch events.

Reconciles read here instead of asking the API server, so a reconcile costs writes only.
Objects are indexed by their controller owner's uid, which is how a parent finds its
children. Pods and nodes are slimmed to the fields kleave reads, to keep memory flat.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Obj = dict[str, Any]


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controlling owner, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def slim_pod(pod: Mapping[str, Any]) -> Obj:
    meta = pod.get("metadata", {})
    status = pod.get("status", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"nodeName": pod.get("spec", {}).get("nodeName")},
        "status": {"phase": status.get("phase"), "conditions": status.get("conditions") or []},
    }


def slim_node(node: Mapping[str, Any]) -> Obj:
    meta = node.get("metadata", {})
    status = node.get("status", {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {"unschedulable": bool(node.get("spec", {}).get("unschedulable"))},
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": status.get("conditions") or [],
        },
    }


_SLIMMERS = {"Pod": slim_pod, "Node": slim_node}


class Store:
    """Objects of one kind by (namespace, name), with an owner-uid index."""

    def __init__(self, kind: str, index_label: str | None = None) -> None:
        self.kind = kind
        self._objects: dict[Key, Obj] = {}
        self._by_owner: dict[str, set[Key]] = defaultdict(set)
        self._slim = _SLIMMERS.get(kind)
        self._index_label = index_label
        self._by_label: dict[Key, set[Key]] = defaultdict(set)

    @staticmethod
    def key_of(obj: Mapping[str, Any]) -> Key:
        meta = obj.get("metadata", {})
        return (str(meta.get("namespace") or ""), str(meta.get("name")))

    def upsert(self, obj: Mapping[str, Any]) -> Obj:
        """Store the object (a slimmed copy for pods and nodes); returns what is stored."""
        stored = self._slim(obj) if self._slim else dict(obj)
        key = self.key_of(stored)
        self._unindex(key)
        self._objects[key] = stored
        owner = controller_uid(stored)
        if owner:
            self._by_owner[owner].add(key)
        value = self._label_value(stored)
        if value is not None:
            self._by_label[(key[0], value)].add(key)
        return stored

    def _label_value(self, obj: Mapping[str, Any]) -> str | None:
        if self._index_label is None:
            return None
        value = (obj.get("metadata", {}).get("labels") or {}).get(self._index_label)
        return None if value is None else str(value)

    def remove(self, obj: Mapping[str, Any]) -> None:
        key = self.key_of(obj)
        self._unindex(key)
        self._objects.pop(key, None)

    def replace_all(self, objects: Iterable[Mapping[str, Any]]) -> None:
        self._objects.clear()
        self._by_owner.clear()
        self._by_label.clear()
        for obj in objects:
            self.upsert(obj)

    def _unindex(self, key: Key) -> None:
        old = self._objects.get(key)
        if old is not None:
            value = self._label_value(old)
            if value is not None:
                self._by_label[(key[0], value)].discard(key)
                if not self._by_label[(key[0], value)]:
                    del self._by_label[(key[0], value)]
            owner = controller_uid(old)
            if owner and owner in self._by_owner:
                self._by_owner[owner].discard(key)
                if not self._by_owner[owner]:
                    del self._by_owner[owner]

    def get(self, namespace: str, name: str) -> Obj | None:
        return self._objects.get((namespace, name))

    def owned_by(self, uid: str) -> list[Obj]:
        """Objects whose controller owner has this uid, sorted by name."""
        keys = sorted(self._by_owner.get(uid, ()))
        return [self._objects[key] for key in keys if key in self._objects]

    def labelled(self, namespace: str, value: str) -> list[Obj]:
        """Objects in ``namespace`` whose index label has ``value``, sorted by name."""
        keys = sorted(self._by_label.get((namespace, value), ()))
        return [self._objects[key] for key in keys if key in self._objects]

    def all(self) -> list[Obj]:
        return list(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)
