"""A private Mosquitto: own directory, free port, password file and ACL, persistence.

Queue limits are set deliberately: Mosquitto's default ``max_queued_messages``
(1000) silently drops QoS 1 messages queued for a lagging persistent session,
which would break the promise that nothing is lost. Sessions expire so that
dead consumers do not accumulate copies forever. The broker names every
session after the account that opens it (``use_username_as_clientid``), so no
client can take over, or wipe, the session of another account; two processes
sharing one account knock each other off, hence one account per process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from gateway.broker_auth import BrokerAccount, _give_to_broker_user, write_broker_files
from gateway.local.ports import free_port, wait_listening


@dataclass
class MosquittoInstance:
    directory: Path
    port: int = 0
    max_queued_messages: int = 2_000_000
    session_expiry: str = "2d"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def password_file(self) -> Path:
        return self.directory / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.directory / "acl"

    @property
    def log_file(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def conf_file(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def data_dir(self) -> Path:
        """``persistence_location``: the broker saves its sessions and queues here."""
        return self.directory / "data"

    def configure(self, accounts: list[BrokerAccount]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port()
        write_broker_files(accounts, self.password_file, self.acl_file)
        conf = self.conf_file
        conf.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    "allow_anonymous false",
                    f"password_file {self.password_file}",
                    f"acl_file {self.acl_file}",
                    f"listener {self.port} 127.0.0.1",
                    "use_username_as_clientid true",
                    # no Nagle on the broker's sockets: an alarm forwarded to a server
                    # must not wait for the previous segment's (delayed) ACK
                    "set_tcp_nodelay true",
                    "persistence true",
                    f"persistence_location {self.data_dir}/",
                    "autosave_interval 30",
                    f"max_queued_messages {self.max_queued_messages}",
                    "max_queued_bytes 0",
                    "max_inflight_messages 0",
                    f"persistent_client_expiration {self.session_expiry}",
                    f"log_dest file {self.log_file}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "",
                ]
            )
        )
        for path in (self.directory, self.data_dir, conf):
            _give_to_broker_user(path)
        if self.log_file.exists():
            _give_to_broker_user(self.log_file)

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(
            [binary, "-c", str(self.conf_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(self.port)
        except TimeoutError:
            self.stop()
            log = self.log_file.read_text() if self.log_file.exists() else "(no log)"
            raise RuntimeError(f"mosquitto did not start:\n{log}") from None

    def reload(self) -> None:
        """Re-read password and ACL files (SIGHUP)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
