"""Fixtures of the transport tests: certificates for the TLS ones."""

import os

import pytest
import trustme

from migrator.transport import client_context, server_context


class Certs:
    """A CA and a server certificate for 127.0.0.1 as PEM files (and one more CA, trusted by no one)."""

    def __init__(self, directory) -> None:
        self.dir = directory
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        self.ca = self._write("ca.pem", ca.cert_pem)
        self.cert = self._write("cert.pem", *issued.cert_chain_pems)
        self.key = self._write("key.pem", issued.private_key_pem)
        self.other_ca = self._write("other-ca.pem", trustme.CA().cert_pem)
        elsewhere = ca.issue_cert("10.11.12.13", "example.org")
        self.elsewhere_cert = self._write("elsewhere.pem", *elsewhere.cert_chain_pems)
        self.elsewhere_key = self._write("elsewhere-key.pem", elsewhere.private_key_pem)

    def _write(self, name, *blobs) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.writelines(blob.bytes() for blob in blobs)
        return path

    def server(self):
        return server_context(self.cert, self.key)

    def client(self):
        return client_context(self.ca)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls"))
