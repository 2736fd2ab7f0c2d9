"""The kernel's TCP byte counts, as fa_hvd.comm.traffic reads them, on a real loopback connection."""

import os
import socket
import struct

from fa_hvd.comm import traffic


def connected_pair():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    server.close()
    return client, peer


def received(sock, size):
    got = b""
    while len(got) < size:
        got += sock.recv(size - len(got))
    return got


def test_bytes_sent_and_received_on_a_connection():
    """Per socket, so that no other socket of the test process (the suite's other tests) counts here."""
    client, peer = connected_pair()
    client.sendall(b"x" * 5000)
    received(peer, 5000)
    peer.sendall(b"y" * 300)
    received(client, 300)
    try:
        counts = traffic.tcp_socket_bytes()
        assert counts[os.fstat(client.fileno()).st_ino] == (5000, 300)
        assert counts[os.fstat(peer.fileno()).st_ino] == (300, 5000)
    finally:
        client.close()
        peer.close()


def test_retransmitted_bytes_are_not_counted_as_sent(monkeypatch):
    """A loaded host retransmits even on loopback; those bytes say nothing about what an exchange sends."""
    client, peer = connected_pair()
    client.sendall(b"x" * 5000)
    received(peer, 5000)
    real = socket.socket.getsockopt

    def with_retransmissions(sock, level, option, *size):
        info = bytearray(real(sock, level, option, *size))
        if option == socket.TCP_INFO and sock.getsockname() == client.getsockname():
            struct.pack_into("Q", info, traffic._TCP_INFO_BYTES_RETRANS, 1200)
        return bytes(info)

    try:
        monkeypatch.setattr(socket.socket, "getsockopt", with_retransmissions)
        counts = traffic.tcp_socket_bytes()
        assert counts[os.fstat(client.fileno()).st_ino] == (5000 - 1200, 0)
        assert counts[os.fstat(peer.fileno()).st_ino] == (0, 5000)
    finally:
        client.close()
        peer.close()
