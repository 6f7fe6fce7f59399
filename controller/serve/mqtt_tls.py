"""The controller's MQTT TLS client identity: one ``ssl.SSLContext`` for every paho client.

``edgectl broker config`` writes a broker that requires client certificates from the
device CA; ``edgectl serve`` connects to it with the controller's certificate
(``controller.crt/.key`` in the broker folder). ``[serve]`` names those files (by default
in the folder recorded in ``REPO_DIR/ca/broker.json``: ``controller.identity.broker``'s
``broker_folder``); this module builds the context from them.

Invariants: the context speaks TLS 1.2 or later, verifies the broker's certificate and
host name against the given CA only (not the system store), and presents the
controller's certificate. Every failure is a UsageError naming the ``[serve]`` key and
the file, raised before any client connects.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from controller.base.errors import UsageError

if TYPE_CHECKING:
    from controller.serve.config import ServeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttTlsFiles:
    """The CA that signed the broker's certificate and the controller's client identity."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def client_tls_context(files: MqttTlsFiles) -> ssl.SSLContext:
    """A client context for the broker; raises UsageError naming the key and file at fault."""
    # Not ssl.create_default_context: it would also trust the system's CAs.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(files.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"[serve] mqtt_ca_file: cannot load the CA certificate {files.ca_file}: {exc}"
        ) from None
    try:
        context.load_cert_chain(certfile=str(files.cert_file), keyfile=str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"[serve] mqtt_cert_file/mqtt_key_file: cannot load the certificate "
            f"{files.cert_file} with the key {files.key_file}: {exc} "
            "(`edgectl broker config` writes controller.crt/.key)"
        ) from None
    return context


def check_broker_certificate(
    host: str, port: int, context: ssl.SSLContext, ca_file: Path, timeout_s: float = 5.0
) -> None:
    """One TLS handshake with the broker, so a wrong CA fails at start-up, not in a log.

    Raises UsageError when the broker's certificate does not verify against ``ca_file``
    (an operator mistake: retrying cannot fix it). An unreachable broker or any other
    failure is only logged: paho keeps retrying in the background.
    """
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise UsageError(
            f"[serve] mqtt_ca_file: the broker at {host}:{port} presented a certificate that "
            f"{ca_file} does not verify ({exc.verify_message}); use the ca.crt that "
            "`edgectl broker config` wrote, and connect by a name in the broker's "
            "certificate (its --host values)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        logger.warning(
            "MQTT broker %s:%d: cannot check its certificate yet (%s); connecting in the "
            "background",
            host,
            port,
            exc,
        )


def serve_tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The context ``edgectl serve`` gives its MQTT clients (None: plain MQTT), checked
    against the broker once. Raises UsageError (see ``client_tls_context`` and
    ``check_broker_certificate``)."""
    if not config.mqtt_tls or config.mqtt_host is None:
        return None
    if config.mqtt_ca_file is None or config.mqtt_cert_file is None or config.mqtt_key_file is None:
        raise UsageError("[serve] mqtt_tls needs mqtt_ca_file, mqtt_cert_file and mqtt_key_file")
    context = client_tls_context(
        MqttTlsFiles(config.mqtt_ca_file, config.mqtt_cert_file, config.mqtt_key_file)
    )
    check_broker_certificate(config.mqtt_host, config.mqtt_port, context, config.mqtt_ca_file)
    return context
