"""Asking a real Orthanc what it holds (its REST API)."""

from __future__ import annotations

import httpx

from radflow_devstack.processes import ManagedProcess


class OrthancView:
    def __init__(self, proc: ManagedProcess, auth: tuple[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{proc.port}"
        self._auth = auth

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def _get(self, path: str) -> httpx.Response:
        response = httpx.get(f"{self.url}{path}", auth=self._auth, timeout=30)
        response.raise_for_status()
        return response

    def count(self) -> int:
        return int(self._get("/statistics").json()["CountInstances"])

    def sop_instance_uids(self) -> list[str]:
        ids = self._get("/instances").json()
        return [self._get(f"/instances/{i}/simplified-tags").json()["SOPInstanceUID"] for i in ids]

    def upload(self, data: bytes) -> None:
        """Store a DICOM file through the REST API (no DICOMweb, no forwarder)."""
        httpx.post(
            f"{self.url}/instances", content=data, auth=self._auth, timeout=30
        ).raise_for_status()

    def file(self, sop_instance_uid: str) -> bytes:
        found = httpx.post(
            f"{self.url}/tools/lookup", content=sop_instance_uid, auth=self._auth, timeout=30
        ).json()
        (instance,) = [f for f in found if f["Type"] == "Instance"]
        return self._get(f"/instances/{instance['ID']}/file").content
