"""The standard proxy variables are honoured: HTTP_PROXY, HTTPS_PROXY (CONNECT tunnel with TLS) and NO_PROXY.

The proxy is a real forwarding proxy on 127.0.0.1; the HTTPS origin uses a throw-away self-signed certificate
that the client trusts through SSL_CERT_FILE (the variable the README suggests for inspecting firewalls).
"""
import random

import pytest

from FastSAM3DLib.errors import DownloadError
from FastSAM3DLib.weights.download import download_model
from test_weights_support import (FileServer, ForwardProxy, no_proxy_env, self_signed_tls,  # noqa: F401
                                  server, sha256, write_manifest)

DATA = random.Random(1).randbytes(50_000)


def manifest_for(tmp_path, url):
    return write_manifest(tmp_path / "models.json", {"urls": [url], "size": len(DATA), "sha256": sha256(DATA),
                                                     "filename": "model.pth"})


@pytest.fixture
def proxy(no_proxy_env):
    p = ForwardProxy()
    yield p
    p.stop()


def test_http_proxy_variable_is_used(tmp_path, server, proxy, monkeypatch):
    url = server.serve("/m.pth", DATA)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    path = download_model("test-model", tmp_path / "cache", manifest=manifest_for(tmp_path, url))
    assert path.read_bytes() == DATA
    assert proxy.requests == [("GET", url)]


def test_no_proxy_variable_bypasses_the_proxy(tmp_path, server, proxy, monkeypatch):
    url = server.serve("/m.pth", DATA)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    download_model("test-model", tmp_path / "cache", manifest=manifest_for(tmp_path, url))
    assert proxy.requests == [] and len(server.gets("/m.pth")) == 1


@pytest.fixture
def tls_origin(tmp_path, no_proxy_env, monkeypatch):
    """An HTTPS origin "weights.test" serving DATA with a self-signed certificate, reachable only through a
    forwarding proxy that HTTPS_PROXY names: (origin, proxy, certificate file)."""
    context, cert = self_signed_tls(tmp_path, "weights.test")
    origin = FileServer(tls=context)
    origin.serve("/m.pth", DATA)
    p = ForwardProxy(tunnels={"weights.test:443": ("127.0.0.1", origin.port)})
    monkeypatch.setenv("HTTPS_PROXY", p.url)
    try:
        yield origin, p, cert
    finally:
        p.stop()
        origin.stop()


def test_https_proxy_variable_tunnels_to_a_tls_server(tmp_path, tls_origin, monkeypatch):
    origin, p, cert = tls_origin
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    url = "https://weights.test/m.pth"  # resolvable only by the proxy
    path = download_model("test-model", tmp_path / "cache", manifest=manifest_for(tmp_path, url))
    assert path.read_bytes() == DATA
    assert p.requests == [("CONNECT", "weights.test:443")] and len(origin.gets("/m.pth")) == 1


def test_proxy_refusing_the_tunnel_gives_proxy_advice(tmp_path, proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    url = "https://weights.test/m.pth"
    with pytest.raises(DownloadError) as err:
        download_model("test-model", tmp_path / "cache", manifest=manifest_for(tmp_path, url), timeout=5)
    assert proxy.requests == [("CONNECT", "weights.test:443")]
    message = str(err.value)
    assert "cannot connect" in message and "HTTPS_PROXY" in message and "import test-model FILE" in message


def test_an_untrusted_certificate_points_to_ssl_cert_file(tmp_path, tls_origin, monkeypatch):
    """An inspecting firewall's certificate looks like this self-signed one: the message names the way out."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    manifest = manifest_for(tmp_path, "https://weights.test/m.pth")
    with pytest.raises(DownloadError) as err:
        download_model("test-model", tmp_path / "cache", manifest=manifest, timeout=5)
    message = str(err.value)
    assert "secure connection failed" in message and "SSL_CERT_FILE" in message, message
    assert "import test-model FILE" in message and not (tmp_path / "cache" / "model.pth").exists()
