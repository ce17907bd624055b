"""A real Orthanc PACS on loopback, for the PACS demo, the tests and the benchmark.

Debian's `orthanc` package (with `orthanc-dicomweb`, and `orthanc-python` for the
stable-study trigger) started as a plain process from a config file written here:
free loopback ports chosen at run time, its own storage folder, its own AE title and
the modalities (AE title, host, port) it may talk to, as a site's PACS administrator
would register medxfer. Stopped by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from stack.settings import free_port

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN, PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so", PLUGIN_DIR / "libOrthancPython.so"
DICOMWEB_ROOT = "/dicom-web/"


class OrthancNotInstalled(RuntimeError):
    """The Debian packages are missing (`apt-get install orthanc orthanc-dicomweb orthanc-python`)."""


def orthanc_binary() -> str:
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if binary is None or not DICOMWEB_PLUGIN.exists():
        raise OrthancNotInstalled("Orthanc with its DICOMweb plugin is not installed: "
                                  "apt-get install orthanc orthanc-dicomweb orthanc-python")
    return binary


@dataclass
class LocalOrthanc:
    """One Orthanc process. `modalities`: name -> (AE title, host, port) it may query, move to or
    be called by; `users`: HTTP basic-auth users (none: no authentication); `python_script`: loaded
    by the Python plugin; `extra`: more settings. (No HTTPS: Debian's Orthanc 1.10.1 crashes on the
    first TLS request, its civetweb against OpenSSL 3; put a TLS-terminating proxy in front.)"""

    home: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    users: dict[str, str] | None = None
    python_script: Path | None = None
    http_headers: dict[str, str] = field(default_factory=dict)  # what its own HTTP clients send (a token)
    stable_age_seconds: int = 2
    extra: dict = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    def config(self) -> dict:
        plugins = [str(DICOMWEB_PLUGIN)] + ([str(PYTHON_PLUGIN)] if self.python_script else [])
        storage = self.home / "storage"
        config = {
            "Name": f"medxfer-test-{self.aet}", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "Plugins": plugins, "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users or {}, "DicomCheckCalledAet": True, "DicomCheckModalityHost": True,
            # Only registered modalities may query and retrieve, as on a hospital's PACS.
            "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "StableAge": self.stable_age_seconds, "SaveJobs": False, "HttpDescribeErrors": True,
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False},
        }
        if self.python_script:
            config["PythonScript"] = str(self.python_script)
        return config | self.extra

    def start(self, timeout: float = 60.0) -> LocalOrthanc:
        """Write the config, start Orthanc and wait until both its HTTP and DICOM ports answer."""
        binary = orthanc_binary()
        self.home.mkdir(parents=True, exist_ok=True)
        config_path = self.home / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.home / "orthanc.log", "ab")
        # TCP_NODELAY: DCMTK (Orthanc's DICOM layer) then disables Nagle's algorithm, which otherwise
        # holds each DIMSE answer back for the client's delayed ACK (about 40 ms per message).
        self.process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        env=os.environ | {"TCP_NODELAY": "1"}, cwd=self.home, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.home / 'orthanc.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start within {timeout:.0f} s; see {self.home / 'orthanc.log'}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            ok = requests.get(self.url + "/system", auth=self.auth, headers=self.http_headers, timeout=2).ok
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                return ok
        except (requests.RequestException, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM to the pid started here, SIGKILL if it has not gone within 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """Orthanc's own REST API (loading test data, reading its state); raises on an error status."""
        response = requests.request(method, self.url + path, auth=self.auth, headers=self.http_headers, timeout=60,
                                    **kwargs)
        response.raise_for_status()
        return response

    def upload(self, data: bytes) -> str:
        """Store one DICOM file's exact bytes; its Orthanc instance id."""
        return self.rest("POST", "/instances", data=data).json()["ID"]

    def upload_folder(self, root: Path) -> int:
        """Store every .dcm file under `root`; how many."""
        files = sorted(Path(root).rglob("*.dcm"))
        for path in files:
            self.upload(path.read_bytes())
        return len(files)
