"""The notifier runner inside a real ``eldersafe server``: a smoke raise published over MQTT
reaches the bureau's safety network as a signed webhook, recorded in the audit chain."""

from __future__ import annotations

import copy
import hashlib
import hmac
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from support import GATEWAY_PASSWORDS, publish_all, scalar, wait_for
from test_alert_engine import DISTRICT, rows

from gateway.alerts.district import District, import_district
from gateway.contract.payloads import EventPayload, EventType, Phase, dump, now_utc

SECRET = "server-test-bureau-key"


class Bureau(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Bureau.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_server_delivers_a_smoke_alert_to_the_bureau_signed(
    database: str, broker: Any, make_server: Any
) -> None:
    bureau = ThreadingHTTPServer(("127.0.0.1", 0), Bureau)
    threading.Thread(target=bureau.serve_forever, daemon=True).start()
    try:
        district = copy.deepcopy(DISTRICT)
        district["organisations"][0]["webhook_url"] = (
            f"http://127.0.0.1:{bureau.server_address[1]}/bureau"
        )
        import_district(database, District.model_validate(district))
        server = make_server(database, broker.port, ELDERSAFE_BUREAU_WEBHOOK_SECRET=SECRET)
        server.start()
        server.wait_session()
        event = EventPayload(v=1, event_id=uuid.uuid4(), type=EventType.SMOKE, phase=Phase.RAISE,
                             time=now_utc(), profile="es-sd1")  # fmt: skip
        topic = "eldersafe/v1/site-a/smoke-1/event"
        assert publish_all(broker.port, "gw-site-a", GATEWAY_PASSWORDS["gw-site-a"],
                           [(topic, dump(event), 1)]) == [0]  # fmt: skip
        wait_for(lambda: len(Bureau.received) >= 1, 20,
                 f"the bureau's webhook; log:\n{server.log_tail()}")  # fmt: skip
        headers, body = Bureau.received[0]
        ts = headers["x-eldersafe-timestamp"]
        mac = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["x-eldersafe-signature"] == "sha256=" + mac
        wait_for(
            lambda: scalar(database, "SELECT status FROM notifications WHERE channel = 'webhook'")
            == "sent",
            10,
            "the webhook row recorded as sent",
        )
        assert rows(database, "SELECT count(*) FROM alert_audit WHERE action = 'notified'"
                    " AND channel = 'webhook'") == [(1,)]  # fmt: skip
    finally:
        bureau.shutdown()
        bureau.server_close()
